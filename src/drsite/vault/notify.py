"""Wake-ups across the vault processes of one PostgreSQL database (LISTEN/NOTIFY).

Several vault processes share the database (``vault serve --workers N``, more machines): an
agent's long poll may wait in one process while the controller queues its command in another,
and a command's result may end in one process while the job waiting for it runs in the
controller. In-process hooks (``push.CommandPush``) only see their own commits, so each write
transaction that queues a command or ends one also sends ``NOTIFY drsite`` (delivered by
PostgreSQL at commit, dropped at rollback), and every process listens on its own connection:

- payload ``c:HOST`` — a command for HOST was queued: its long polls here look at once;
- payload ``b:HOST,HOST`` — a job wants these hosts' next heartbeat now
  (``push.want_heartbeat``): their long polls here answer ``"heartbeat": true`` (sent at most
  once per ``push.BEAT_ASK_GAP_S`` per host by each process);
- payload ``e:JOBS;ITEMS`` — commands ended (their jobs' and items' ids, comma-separated):
  the job runner asks the jobs that may wait for them at once (in the controller; elsewhere
  harmless); ``j`` — the same for every job (the ids did not fit); ``n`` — a job was created:
  every job is asked, and the runner lists the active jobs again.

With notifications the long polls look at the table only every ``POLL_WITH_NOTIFY_S`` as a
safety net, instead of every second. SQLite (one process) needs none of this.

Responsible for: sending and receiving the wake-ups. Not responsible for: what is delivered
(``commands``) or when a job runs (``jobs.runner``); a lost notification only delays until the
next poll or round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.orm import Session

from drsite.core.states import FINAL_COMMAND_STATUSES, CommandStatus
from drsite.vault.db.models import Command, Job
from drsite.vault.push import Ended, Waiters, beats_wanted

log = logging.getLogger(__name__)

CHANNEL = "drsite"
POLL_WITH_NOTIFY_S = 5.0
MAX_PAYLOAD = 7000  # PostgreSQL's limit is 8000 bytes
BEATS_PER_NOTIFY = MAX_PAYLOAD // 65  # host ids are 64 characters at most, and a comma


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def after_flush(session: Session, _ctx: Any) -> None:
    """Session hook (write sessions): queue the NOTIFYs for what this flush wrote."""
    hosts: set[str] = set()
    jobs: set[str] = set()
    items: set[str] = set()
    ended = new_job = False
    for obj in (*session.new, *session.dirty):
        if isinstance(obj, Command):
            if obj.status == CommandStatus.PENDING:
                hosts.add(obj.host_id)
            elif obj not in session.new and obj.status in FINAL_COMMAND_STATUSES:
                ended = True
                jobs.update([obj.job_id] if obj.job_id else [])
                items.update([obj.item_id] if obj.item_id else [])
        elif isinstance(obj, Job) and obj in session.new:
            new_job = True
    payloads = [f"c:{h}" for h in sorted(hosts)]
    if new_job:
        payloads.append("n")
    elif ended:
        e = f"e:{','.join(sorted(jobs))};{','.join(sorted(items))}"
        payloads.append(e if len(e) <= MAX_PAYLOAD else "j")
    if not payloads:
        return
    conn = session.connection()
    for p in payloads:
        conn.exec_driver_sql("SELECT pg_notify(%(c)s, %(p)s)", {"c": CHANNEL, "p": p[:MAX_PAYLOAD]})


class BeatAnnouncer:
    """Session hook (``before_commit`` of write sessions): announce the heartbeat asks of the
    transaction to every vault process (PostgreSQL delivers them at commit, drops them at
    rollback). A job waiting for a heartbeat asks every round: only the hosts this process's
    ``waiters`` would ask now are announced (the same once-per-``BEAT_ASK_GAP_S`` gate; the
    commit's own ask marks them)."""

    def __init__(self, waiters: Waiters) -> None:
        self.waiters = waiters

    def __call__(self, session: Session) -> None:
        due = self.waiters.beats_due(beats_wanted(session))
        if not due:
            return
        conn = session.connection()
        for i in range(0, len(due), BEATS_PER_NOTIFY):
            conn.exec_driver_sql("SELECT pg_notify(%(c)s, %(p)s)",
                                 {"c": CHANNEL, "p": "b:" + ",".join(due[i:i + BEATS_PER_NOTIFY])})


def parse_ended(body: str) -> Ended:
    """``JOBS;ITEMS`` of an ``e:`` payload: the ended commands' jobs and items."""
    jobs, _, items = body.partition(";")
    return (frozenset(j for j in jobs.split(",") if j),
            frozenset(i for i in items.split(",") if i))


class Listener:
    """A thread holding one connection that LISTENs on ``drsite`` and calls ``on_hosts`` /
    ``on_jobs`` for what arrives; it reconnects after a failure (wake-ups lost meanwhile only
    wait for the next poll)."""

    def __init__(self, url: str, on_hosts: Callable[[set[str]], None],
                 on_jobs: Callable[[Ended | None], None],
                 on_new_job: Callable[[], None],
                 on_beats: Callable[[set[str]], None] | None = None) -> None:
        self.url = _libpq(url)
        self.on_hosts = on_hosts
        self.on_beats = on_beats
        self.on_jobs = on_jobs
        self.on_new_job = on_new_job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="drsite-vault-listen",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    while not self._stop.is_set():
                        # returns at the first notification (handled at once) or after 1 s
                        for n in conn.notifies(timeout=1.0, stop_after=1):
                            if n.payload.startswith("c:"):
                                self.on_hosts({n.payload[2:]})
                            elif n.payload.startswith("b:"):
                                if self.on_beats is not None:
                                    self.on_beats({h for h in n.payload[2:].split(",") if h})
                            elif n.payload.startswith("e:"):
                                self.on_jobs(parse_ended(n.payload[2:]))
                            elif n.payload == "j":
                                self.on_jobs(None)
                            elif n.payload == "n":
                                self.on_new_job()
            except Exception as e:  # the database went away: listen again soon
                self.listening.clear()
                log.warning("listening for vault notifications failed (%s: %s); again in 1 s",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self._stop.wait(1.0)
        self.listening.clear()
