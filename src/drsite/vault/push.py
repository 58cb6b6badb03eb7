"""Commands pushed to agents: the long-poll channel's waiting and waking.

Each agent keeps one request open on ``POST /api/v1/agent/commands/wait`` (same mTLS as every
agent route). The handler takes the host's ``pending`` commands
(:func:`drsite.vault.commands.deliver_pending`, in a short transaction); when there are none it
waits until either

- a transaction of **this process** that added or changed a command of that host commits
  (:class:`CommandPush` watches the vault's sessions: ``after_flush`` notes the hosts,
  ``after_commit`` wakes their waiters) — milliseconds; or
- ``poll_s`` passes — the fallback for commands written by **another process** on the same
  database (several API workers, another controller): the waiter looks at the table again;
  delivery never depends on in-process state alone.

A command is marked ``sent`` in the same transaction that reads it, so two waiters of one host
(an agent that reconnected while its old request was still open) never both take it; one that
the agent then does not receive (the reply was lost) is re-delivered by the heartbeat rule
(``commands.deliver``), which knows what the agent holds.

A job that waits for a host's next heartbeat (a store access list to be confirmed, a first
point to reach the catalogue) asks for it (:func:`want_heartbeat`): after its transaction
commits, the host's long poll answers at once with ``"heartbeat": true`` and the agent beats
now instead of at the end of its interval (asked at most once per ``BEAT_ASK_GAP_S`` per host;
on PostgreSQL the ask is also announced to the other vault processes, whose long poll of that
host, open or next, answers the same way; an ask not answered within ``BEAT_ASK_TTL_S`` is
dropped — the heartbeat it wanted has come on time by then).

The same hook kicks the background loop (:meth:`CommandPush.on_change`) when a job is created
or a command ends, so a job's next task runs at once instead of at the next loop tick.

Responsible for: waking waiters and the loop. Not responsible for: which commands are due
(``commands``), or what an agent does with them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from drsite.core.states import FINAL_COMMAND_STATUSES
from drsite.vault.db.models import Command, Job, Point

log = logging.getLogger(__name__)

_HOSTS = "drsite_push_hosts"
_KICK = "drsite_push_kick"
_NEW_JOB = "drsite_push_new_job"
_BEATS = "drsite_push_beats"

BEAT_ASK_GAP_S = 1.0  # a host is asked for an early heartbeat at most this often
BEAT_ASK_TTL_S = 10.0  # an ask no long poll answered is dropped after this


def want_heartbeat(s: Session, host_id: str) -> None:
    """A job in this transaction waits for the host's next heartbeat: once the transaction
    commits, its command channel asks the agent for one now (:meth:`Waiters.want_beat`; on
    PostgreSQL the other vault processes hear it too, ``notify.before_commit``)."""
    s.info.setdefault(_BEATS, set()).add(host_id)


def beats_wanted(s: Session) -> set[str]:
    """The hosts this transaction asks for a heartbeat (:func:`want_heartbeat`)."""
    return set(s.info.get(_BEATS) or ())


class Waiters:
    """Per host, the long polls waiting in this process (any event loop). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_host: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.closed = False  # the server stops: long polls answer at once
        # hosts asked for a heartbeat whose long poll has not answered it yet, and when each
        # host was last asked (monotonic)
        self._beats: set[str] = set()
        self._asked: dict[str, float] = {}

    def close(self) -> None:
        """The server is stopping: wake every waiter (it answers with what is pending, or
        nothing) and let later ones answer without waiting."""
        with self._lock:
            self.closed = True
            targets = [w for ws in self._by_host.values() for w in ws]
        self._set(targets)

    def wake(self, host_ids: set[str]) -> None:
        with self._lock:
            targets = [w for h in host_ids for w in self._by_host.get(h, [])]
        self._set(targets)

    @staticmethod
    def _set(targets: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
        for loop, ev in targets:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # its loop is closed: the waiter is gone
                continue

    def want_beat(self, host_ids: set[str]) -> None:
        """Ask these hosts for a heartbeat now: their long poll (the one open, or the next)
        answers at once with ``"heartbeat": true``. A host asked less than
        ``BEAT_ASK_GAP_S`` ago is not asked again (a job is asked every loop round)."""
        now = time.monotonic()
        with self._lock:
            hosts = self._not_asked(host_ids, now)
            for h in hosts:
                self._asked[h] = now
            self._beats |= hosts
            targets = [w for h in hosts for w in self._by_host.get(h, [])]
        self._set(targets)

    def beats_due(self, host_ids: set[str]) -> list[str]:
        """Of these hosts, those :meth:`want_beat` would ask now (not asked within
        ``BEAT_ASK_GAP_S``), sorted; marks nothing (``notify.BeatAnnouncer`` announces those)."""
        with self._lock:
            return sorted(self._not_asked(host_ids, time.monotonic()))

    def _not_asked(self, host_ids: set[str], now: float) -> set[str]:
        return {h for h in host_ids if now - self._asked.get(h, -BEAT_ASK_GAP_S) >= BEAT_ASK_GAP_S}

    def take_beat(self, host_id: str) -> bool:
        """Whether the host was asked for a heartbeat within ``BEAT_ASK_TTL_S`` (once: the
        caller's reply says so)."""
        with self._lock:
            if host_id in self._beats:
                self._beats.discard(host_id)
                return time.monotonic() - self._asked.get(host_id, 0.0) <= BEAT_ASK_TTL_S
            return False

    def register(self, host_id: str) -> asyncio.Event:
        """An event set whenever the host's commands change (the caller clears it before each
        look at the table, and must :meth:`unregister` it)."""
        ev = asyncio.Event()
        with self._lock:
            self._by_host.setdefault(host_id, []).append((asyncio.get_running_loop(), ev))
        return ev

    def unregister(self, host_id: str, ev: asyncio.Event) -> None:
        with self._lock:
            lst = [w for w in self._by_host.get(host_id, []) if w[1] is not ev]
            if lst:
                self._by_host[host_id] = lst
            else:
                self._by_host.pop(host_id, None)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._by_host.values())


# ended commands: (their jobs' ids, their items' ids) — the jobs that may wait for them
Ended = tuple[frozenset[str], frozenset[str]]


class CommandPush:
    """Session hooks: after a commit that touched commands, wake their hosts' waiters; after
    one that ended commands, call ``on_change`` with their jobs and items (the jobs waiting for
    them are asked at once, not every job); after one that created a job, ``on_new_job``."""

    def __init__(self, waiters: Waiters, on_change: Callable[[Ended], None] | None = None,
                 on_new_job: Callable[[], None] | None = None) -> None:
        self.waiters = waiters
        self.on_change = on_change
        self.on_new_job = on_new_job

    def after_flush(self, session: Session, _ctx: Any) -> None:
        hosts: set[str] = session.info.setdefault(_HOSTS, set())
        for obj in (*session.new, *session.dirty):
            if isinstance(obj, Command):
                hosts.add(obj.host_id)
                if obj not in session.new and obj.status in FINAL_COMMAND_STATUSES:
                    # a job may be waiting for this result: its own, or one of its item
                    jobs, items = session.info.setdefault(_KICK, (set(), set()))
                    if obj.job_id is not None:
                        jobs.add(obj.job_id)
                    if obj.item_id is not None:
                        items.add(obj.item_id)
            elif isinstance(obj, Job) and obj in session.new:
                session.info[_NEW_JOB] = True
            elif isinstance(obj, Point) and obj in session.new:
                # a job may wait for the item's point to reach the catalogue (a heartbeat
                # brought it): its item's jobs are asked at once
                session.info.setdefault(_KICK, (set(), set()))[1].add(obj.item_id)

    def after_commit(self, session: Session) -> None:
        hosts = session.info.pop(_HOSTS, None)
        kick = session.info.pop(_KICK, None)
        new_job = session.info.pop(_NEW_JOB, False)
        beats = session.info.pop(_BEATS, None)
        if hosts:
            self.waiters.wake(hosts)
        if beats:
            self.waiters.want_beat(beats)
        if new_job and self.on_new_job is not None:
            self.on_new_job()
        if kick is not None and self.on_change is not None:
            self.on_change((frozenset(kick[0]), frozenset(kick[1])))

    def after_rollback(self, session: Session) -> None:
        session.info.pop(_HOSTS, None)
        session.info.pop(_KICK, None)
        session.info.pop(_NEW_JOB, None)
        session.info.pop(_BEATS, None)
