"""The controller: of all vault processes on one database, the one that runs the background work
(job runner, scheduler, health monitor, and any other loop), elected through a lease row with
an epoch (table ``controller_lease``, row ``controller``).

Why a lease row and not an advisory lock: an advisory lock lives and dies with one database
connection, so it says nothing about a process that hangs while its connection stays open, and
it leaves no number behind. The lease row expires by the database's clock unless renewed, and
its ``epoch`` — bumped at every acquisition — is a fencing token: what the controller writes is
refused once a newer epoch exists. (Issue 14 builds on it: a standby vault takes the lease with
a higher epoch at promotion; the old active, fenced, cannot write.)

The rules:

- **Election** (:meth:`Lease.step`, every ``lease_s / 3``): in one transaction, lock the row
  (``SELECT … FOR NO KEY UPDATE``, with a lock timeout on PostgreSQL). If it names this
  process at the epoch it acquired, renew it (``expires_at = now + lease_s``). Otherwise, if it is free —
  never held, released, expired, or held by a process that provably no longer exists (same
  machine, same boot, same PID namespace, PID gone or reused) — take it: ``epoch + 1``, this
  holder, ``expires_at = now + lease_s``. Otherwise wait until it expires. Times are the
  database server's (``clock_timestamp()``; SQLite: this machine's), so vault machines need
  not agree on the time. A process stopped while holding the lease loses it one lease period
  after its last renewal; a candidate tries again just after ``expires_at``, so it takes over
  within one lease period of the holder's death. A clean stop releases the lease (the next
  candidate takes it at once).
- **Fencing** (:meth:`Lease.guard`, run by :meth:`Database.guarded` at the start of every
  controller write transaction): read the row ``FOR KEY SHARE`` and refuse (:class:`NotController`,
  rolled back, nothing written) unless it still names this process at its epoch. The share lock
  is held until the transaction ends, and a takeover locks the row ``FOR UPDATE`` before it
  changes the epoch, so no takeover can commit in between (a renewal, which changes neither
  epoch nor holder, locks ``FOR NO KEY UPDATE``: it runs beside the controller's
  transactions): every controller write — and every side effect a job step starts inside
  its transaction — happens under a lease that is still this process's. An old controller
  that wakes up after a pause finds the newer epoch and steps down. PostgreSQL ends a session
  idle inside a transaction for ``lease_s / 2`` (``idle_in_transaction_session_timeout``), so
  a stopped process cannot hold the share lock, or any row lock, for ever.
- On SQLite (one process: ``vault serve --workers`` needs PostgreSQL) the same rules hold
  trivially: the lease is taken at start, and ``BEGIN IMMEDIATE`` serialises the check and the
  writes.

Responsible for: who the controller is, and refusing the writes of one that no longer is. Not
responsible for: what the controller does (``context.Vault``'s round), or API requests — every
process serves the API; requests write in their own transactions, unfenced.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from drsite import __version__
from drsite.core.errors import DrsiteError, Fenced, StandbyVault
from drsite.vault.db.database import Database
from drsite.vault.db.models import ControllerLease

log = logging.getLogger(__name__)
# PostgreSQL ended the session: idle-in-transaction timeout (a vault stopped mid-transaction),
# admin shutdown, crash shutdown, cannot connect now
DROPPED_BY_SERVER = frozenset(("25P03", "57P01", "57P02", "57P03"))

LEASE = "controller"
LOCK_TIMEOUT_MS = 2000  # an election round never waits longer than this for the row


class NotController(Fenced):
    """A controller write refused: this process does not hold the controller lease at the
    epoch it acted under (another vault process took over, or it never held it). Nothing of the
    transaction was written. Travels as ``fenced``."""

    default_hint = ("Nothing to do: another vault process is the controller now and carries "
                    "on; see 'GET /api/v1/controller'.")


# ------------------------------------------------------------------------------ who we are

def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None when there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Identity:
    """This process as a lease holder: a unique ``holder`` string and what the row shows about
    it (``info``: host, pid, start time, boot and PID namespace, version, listen address)."""

    holder: str
    info: dict[str, Any]


def this_process(listen: str | None = None, url: str | None = None) -> Identity:
    """``url``: where agents and operators reach this vault (a standby names the holder's as
    the active vault's)."""
    host, pid = socket.gethostname(), os.getpid()
    info: dict[str, Any] = {"host": host, "pid": pid, "start": _start_ticks(pid),
                            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
                            "pidns": _pid_namespace(), "version": __version__, "listen": listen,
                            "url": url}
    return Identity(f"{host}:{pid}:{uuid.uuid4().hex[:12]}", info)


def holder_gone(info: dict[str, Any]) -> bool:
    """True only when the process ``info`` describes provably no longer exists: it ran on this
    machine (same host name, same boot, same PID namespace) and its PID is gone or now belongs
    to a process that started at another time. Anything else (another machine, no /proc) is
    not known to be gone: its lease must expire."""
    me = this_process().info
    if not info or any(info.get(k) != me[k] or me[k] is None for k in ("host", "boot_id", "pidns")):
        return False
    pid, start = info.get("pid"), info.get("start")
    if not isinstance(pid, int) or start is None:
        return False
    return bool(_start_ticks(pid) != start)


# ------------------------------------------------------------------------------ the lease

def db_now(s: Session) -> float:
    """The database server's time (PostgreSQL), or this machine's (SQLite), in epoch seconds."""
    bind = s.get_bind()
    if bind.dialect.name == "postgresql":
        return float(s.execute(text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one())
    return time.time()


@dataclass(frozen=True)
class LeaseView:
    """The lease row as the API shows it."""

    holder: str | None
    epoch: int
    info: dict[str, Any]
    acquired_at: float | None
    renewed_at: float | None
    expires_at: float
    now: float

    @property
    def live(self) -> bool:
        return self.holder is not None and self.expires_at > self.now

    def to_dict(self) -> dict[str, Any]:
        info = self.info or {}
        return {"holder": self.holder, "epoch": self.epoch, "live": self.live,
                "host": info.get("host"), "pid": info.get("pid"), "listen": info.get("listen"),
                "url": info.get("url"),
                "version": info.get("version"), "acquired_at": self.acquired_at,
                "renewed_at": self.renewed_at, "expires_at": self.expires_at,
                "expires_in_s": round(self.expires_at - self.now, 3)}


def read_lease(s: Session) -> LeaseView:
    now = db_now(s)
    row = s.get(ControllerLease, LEASE)
    if row is None:
        return LeaseView(None, 0, {}, None, None, 0.0, now)
    return LeaseView(row.holder, row.epoch, dict(row.info or {}), row.acquired_at, row.renewed_at,
                     row.expires_at, now)


class Lease:
    """This process's side of the controller lease: acquire, renew, release, and the fence.

    ``epoch`` is the epoch this process holds (None when it is not the controller); ``term``
    counts this process's acquisitions, so the work loop can tell a new term (resume the jobs
    the previous controller left) from a renewal."""

    def __init__(self, db: Database, ident: Identity, ttl_s: float,
                 on_change: Callable[[], None] | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError("the lease period must be > 0")
        self.db = db
        self.ident = ident
        self.ttl_s = ttl_s
        self.on_change = on_change
        self._mutex = threading.Lock()
        # one election round at a time in this process: a promotion's forced step racing the
        # election thread's step read "not mine" before the other committed, took the lease
        # from itself at a newer epoch and fenced its own first term
        self._stepping = threading.Lock()
        self._epoch: int | None = None
        self.term = 0

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def held(self) -> bool:
        """Whether this process is the controller (as far as it knows: the fence decides)."""
        return self._epoch is not None

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 3.0

    def _lock_timeout(self, s: Session) -> None:
        if not self.db.sqlite:
            s.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))

    def step(self, *, force: bool = False, min_epoch: int = 0) -> float:
        """One election round: renew the lease if it is ours, take it if it is free. Returns
        how long to wait before the next round. Database errors propagate (the caller retries
        soon); the local state changes only after a commit.

        ``force`` takes the lease whoever holds it (a new epoch): for a promotion (issue 14:
        a standby vault promoted with its database) or an operator who knows the holder is
        gone. The old holder is fenced from its next transaction on. ``min_epoch``: a taken
        lease's epoch is at least this (the epoch a pair's witness granted a promotion)."""
        with self._stepping:
            return self._step(force=force, min_epoch=min_epoch)

    def _step(self, *, force: bool, min_epoch: int) -> float:
        mine = self._epoch
        with self.db.tx() as s:
            self._lock_timeout(s)
            # FOR NO KEY UPDATE: one election round at a time, yet beside the fence's KEY
            # SHARE — a renewal (epoch and holder unchanged) never waits for, nor holds up,
            # the controller's own transactions; a takeover locks FOR UPDATE below
            row = s.scalars(select(ControllerLease).where(ControllerLease.name == LEASE)
                            .with_for_update(key_share=True)).first()
            now = db_now(s)
            if row is None:  # a database the migration did not seed (cannot happen; be safe)
                row = ControllerLease(name=LEASE, epoch=0, holder=None, info={}, expires_at=0.0)
                s.add(row)
                s.flush()
            holder, epoch = row.holder, row.epoch
            renew = mine is not None and holder == self.ident.holder and epoch == mine
            take = not renew and (force or holder is None or holder == self.ident.holder
                                  or row.expires_at <= now or holder_gone(row.info or {}))
            if take and not self.db.sqlite:
                # the fence: wait (lock_timeout) for every open transaction of the old
                # controller, which holds the row FOR KEY SHARE, before the epoch changes
                s.execute(select(ControllerLease.name).where(ControllerLease.name == LEASE)
                          .with_for_update())
            if renew or take:
                if take:
                    if holder is not None and row.expires_at > now:
                        log.warning("controller %s (epoch %d) %s: taking over its lease",
                                    holder, epoch, "is set aside" if force else "no longer runs")
                    row.epoch = epoch = max(epoch + 1, min_epoch)
                    row.holder = self.ident.holder
                    row.info = dict(self.ident.info)
                    row.acquired_at = now
                row.renewed_at = now
                row.expires_at = now + self.ttl_s
            wait = min(max(row.expires_at - now, 0.0) + 0.05, self.renew_every_s)
        if renew:
            return self.renew_every_s
        if mine is not None:
            self._lose(f"the lease now names {holder} at epoch {epoch}")
        if not take:
            log.debug("controller is %s (epoch %d); next look in %.2f s", holder, epoch, wait)
            return wait
        with self._mutex:
            self._epoch = epoch
            self.term += 1
        log.info("this vault process is the controller (epoch %d, lease %.1f s)", epoch,
                 self.ttl_s)
        if self.on_change is not None:
            self.on_change()
        return self.renew_every_s

    def guard(self, s: Session) -> None:
        """The fence, first statement of every controller write transaction (see the module
        docstring): raises :class:`NotController` unless the row names this process at its
        epoch; holds the row ``FOR SHARE`` until the transaction ends (PostgreSQL)."""
        epoch = self._epoch
        if epoch is None:
            raise NotController("this vault process is not the controller")
        q = select(ControllerLease.epoch, ControllerLease.holder).where(ControllerLease.name == LEASE)
        if not self.db.sqlite:
            # FOR KEY SHARE: conflicts with a takeover's FOR UPDATE, not with a renewal's
            # FOR NO KEY UPDATE (a renewal waited for every open controller transaction, and
            # queued every new one behind it: 200 ms a renewal at 1,000 items)
            q = q.with_for_update(read=True, key_share=True)
        row = s.execute(q).first()
        if row is None or row.epoch != epoch or row.holder != self.ident.holder:
            now_epoch = row.epoch if row is not None else None
            self._lose(f"epoch {epoch} was superseded by epoch {now_epoch} "
                       f"({row.holder if row is not None else 'no holder'})")
            raise NotController(f"controller epoch {epoch} was superseded by epoch {now_epoch}; "
                                "this vault process stepped down and wrote nothing")

    def step_down(self, why: str) -> None:
        """Stop being the controller now, without writing (a fenced vault of a pair)."""
        self._lose(why)

    def _lose(self, why: str) -> None:
        with self._mutex:
            if self._epoch is None:
                return
            lost, self._epoch = self._epoch, None
        log.warning("controller lease lost (epoch %d): %s; this vault process steps down",
                    lost, why)
        if self.on_change is not None:
            self.on_change()

    def release(self) -> None:
        """Give the lease up (clean stop): the next candidate takes it at once. Best effort:
        an unreachable database leaves it to expire."""
        epoch = self._epoch
        if epoch is None:
            return
        with self._mutex:
            self._epoch = None
        try:
            with self.db.tx() as s:
                self._lock_timeout(s)
                s.execute(update(ControllerLease)
                          .where(ControllerLease.name == LEASE,
                                 ControllerLease.holder == self.ident.holder,
                                 ControllerLease.epoch == epoch)
                          .values(holder=None, expires_at=0.0))
            log.info("controller lease released (epoch %d)", epoch)
        except (SQLAlchemyError, DrsiteError) as e:  # DrsiteError: a pair's fence refused
            log.warning("could not release the controller lease (epoch %d): %s; it expires "
                        "on its own", epoch, type(e).__name__)

    def view(self) -> LeaseView:
        with self.db.read() as s:
            return read_lease(s)


# ------------------------------------------------------------------------------ the loops

class Controller:
    """Runs the election (a thread renewing or seeking the lease) and the background work (a
    thread calling ``work()`` every ``interval_s``, or sooner when ``kick`` is set) while this
    process holds the lease; ``on_elected()`` runs first in each new term (resume what the
    previous controller left)."""

    def __init__(self, lease: Lease, *, work: Callable[[], None],
                 on_elected: Callable[[], None], interval_s: float,
                 kick: threading.Event | None = None, min_interval_s: float = 0.0) -> None:
        self.lease = lease
        self.work = work
        self.on_elected = on_elected
        self.interval_s = interval_s
        self.min_interval_s = min_interval_s
        self.kick = kick or threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._term_seen = 0

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for name, target in (("drsite-vault-election", self._elect),
                             ("drsite-vault-loop", self._loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, *, release: bool = True) -> None:
        """Stop both threads (the work in progress finishes its round), then release the
        lease (not when ``release`` is False: a fenced vault writes nothing, that included)."""
        self._stop.set()
        self.kick.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        self._threads = []
        if release:
            self.lease.release()

    def ensure_elected(self) -> bool:
        """Run ``on_elected`` if a new term began since the last call; whether this process is
        the controller (for tests that drive rounds themselves)."""
        if not self.lease.held:
            return False
        if self.lease.term != self._term_seen:
            self._term_seen = self.lease.term
            self.on_elected()
        return True

    def _elect(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.lease.step()
            except Exception as e:  # database unreachable, lock timeout: try again soon
                log.warning("controller election round failed: %s: %s", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                wait = min(1.0, self.lease.renew_every_s)
            self._stop.wait(wait)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.ensure_elected():
                    self.work()
            except (NotController, StandbyVault):
                pass  # the lease (or the pair's fence) logged it; the loop waits or stops
            except DBAPIError as e:
                if not (e.connection_invalidated or isinstance(e, OperationalError)
                        or getattr(e.orig, "sqlstate", None) in DROPPED_BY_SERVER):
                    log.exception("vault background loop failed; retrying")
                else:  # the database went away or dropped us (restart, stop, timeout): a fault
                    log.warning("vault background loop: database connection lost (%s: %s); "
                                "retrying", type(e.orig).__name__,
                                str(e.orig).splitlines()[0] if str(e.orig) else "")
            except Exception:  # keep the vault alive; the next round tries again
                log.exception("vault background loop failed; retrying")
            # the next round after interval_s, or at once when kicked (a job was created, a
            # command ended, the lease changed), but not more often than min_interval_s
            self._stop.wait(self.min_interval_s)
            self.kick.wait(max(0.0, self.interval_s - self.min_interval_s))
            self.kick.clear()
