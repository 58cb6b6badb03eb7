"""One running vault: its settings, database, CA, job runner, scheduler and health monitor, and
the background loop that drives the last three.

:func:`bootstrap` prepares a data directory (idempotent): private modes (the directory 0700,
every file in it 0600, also in older deployments), the CA in ``DATA/pki``, the HTTPS server
certificate (SAN localhost, 127.0.0.1), the database schema (``alembic upgrade head``), the
master key that seals secrets in the database (``vault/masterkey.py``; values still in clear are
sealed) and, at first start only, the admin token in ``DATA/admin.token`` (mode 0600). A running
vault holds ``DATA/vault.lock`` shared (a master-key rotation needs it exclusively).

Every vault process serves the API; the background work runs only in the one that holds the
controller lease (:mod:`drsite.vault.controller`), through a fenced view of the database
(``control_db``): a write of a controller that lost the lease is refused before it happens.

A **standby vault** (issue 14) runs on a hot-standby PostgreSQL, a streaming replica of the
active vault's database: it serves reads, refuses every write before it starts
(``StandbyVault``, naming the active vault from the replicated lease row), runs no background
work, and becomes active when its database is promoted — by :meth:`Vault.promote` (``drsite
vault promote``: ``pg_promote()``, then the lease taken with a new epoch whoever holds it), or
by an operator promoting the database by hand (then it seeks the lease as any vault process).
With a witness (``vault serve --witness URL --auto-promote-after N``, ``vault/witnesslink.py``)
a standby whose peer was silent N seconds promotes itself when the witness grants it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from drsite import tlsutil
from drsite.core.errors import Conflict, PermanentError, SecretUnreadable, StandbyVault
from drsite.fsutil import atomic_write_bytes
from drsite.pki import CertificateAuthority
from drsite.vault import masterkey, notify
from drsite.vault.audit import record_event
from drsite.vault.auth import ADMIN_TOKEN_NAME, Role, create_token
from drsite.vault.castate import sync_ca
from drsite.vault.controller import Controller, Lease, NotController, read_lease, this_process
from drsite.vault.db.database import Database, schema_revision
from drsite.vault.db.models import ApiToken
from drsite.vault.db.sealed import attach_sealer
from drsite.vault.drills import DrillScheduler
from drsite.vault.health import HealthMonitor
from drsite.vault.jobs.runner import JobRunner
from drsite.vault.pairfence import Fenced, PeerFence, load_marker, write_marker
from drsite.vault.push import CommandPush, Ended, Waiters
from drsite.vault.scheduler import Scheduler
from drsite.vault.settings import VaultSettings
from drsite.vault.witnesslink import AutoPromote, WitnessLink

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
RUNNER_BUDGET_S = 0.2  # the job runner's share of one background round
# the health pass reads every item: the next one starts at least this many times its own
# duration after it ended (a quarter of the loop at most), however short health_interval is
# (at 5,000 items it was half of the controller's time, and the job runner starved)
HEALTH_REST_FACTOR = 3.0


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def ensure_server_cert(ca: CertificateAuthority, pki_dir: Path) -> TlsFiles:
    cert, key = pki_dir / "server.pem", pki_dir / "server.key"
    if not (cert.exists() and key.exists()):
        cert_pem, key_pem = ca.issue_server_cert(hostnames=["localhost"], ips=["127.0.0.1"])
        atomic_write_bytes(key, key_pem)
        os.chmod(key, 0o600)
        # the chain includes the CA, so an agent can pin it by fingerprint on first contact
        atomic_write_bytes(cert, cert_pem + ca.ca_pem)
    return TlsFiles(ca=pki_dir / "ca.pem", cert=cert, key=key)


def ensure_admin_token(db: Database, data_dir: Path, now: float) -> str | None:
    """At first start (no token at all): create the ``admin`` token, write it to
    ``DATA/admin.token`` (0600) and return it; otherwise None."""
    with db.tx() as s:
        if s.scalars(select(ApiToken.id)).first() is not None:
            return None
        secret = create_token(s, ADMIN_TOKEN_NAME, Role.ADMIN, now)
        record_event(s, now, "token", ADMIN_TOKEN_NAME, "first admin token created")
    path = data_dir / ADMIN_TOKEN_FILE
    atomic_write_bytes(path, (secret + "\n").encode())
    os.chmod(path, 0o600)
    return secret


LOOP_MIN_S = 0.02
# a waiting long poll looks at the commands table this often (commands written by another
# process on the same database, when no notification wakes it); this process's own commits
# wake it at once
PUSH_POLL_S = 1.0
# a standby vault looks this often whether its database was promoted
ROLE_POLL_S = 1.0
PROMOTE_TIMEOUT_S = 60


# Agent requests write (a heartbeat, a command result and a delivery are each a transaction).
# On SQLite one transaction writes at a time: 40 threads queued on the write lock held every
# thread of the pool, and an operator's GET (a read, which WAL serves beside the writer) waited
# for a free thread — GET /items p99 340 ms at 1,000 items. A few threads keep the writer busy.
AGENT_THREADS_SQLITE = 8
AGENT_THREADS = 24  # PostgreSQL writes in parallel (pool: database.POOL_SIZE + POOL_OVERFLOW)


class Vault:
    """Everything one vault process holds. Built by :func:`bootstrap` (or :func:`attach`)."""

    def __init__(self, settings: VaultSettings, db: Database, ca: CertificateAuthority,
                 tls: TlsFiles, new_admin_token: str | None,
                 lock: masterkey.DataDirLock | None = None, *, standby: bool = False) -> None:
        self.settings = settings
        # a standby's database is a hot standby: every write is refused before it starts
        self.standby = standby
        self._role_lock = threading.Lock()
        # one promotion at a time: an operator's and the standby's automatic one (rule 1) raced
        # — both claimed at the witness, the second at yet another epoch (re-entrant: the
        # automatic one promotes through promote())
        self._promote_lock = threading.RLock()
        self._role_stop = threading.Event()
        self._role_thread: threading.Thread | None = None
        self._started = False
        # a vault of a pair: fenced (marker in DATA) once its peer was promoted past it
        self.fenced: Fenced | None = load_marker(settings.data_dir)
        self.fence: PeerFence | None = None
        self.witness: WitnessLink | None = None
        self.autopromote: AutoPromote | None = None
        if settings.witness_url and settings.advertised_url:
            self.witness = WitnessLink(settings.witness_url, settings.witness_token or "",
                                       tlsutil.client_context(tls.ca),
                                       me=settings.advertised_url, lease_s=settings.lease_s)
        if settings.peer_url:
            self.fence = PeerFence(settings.peer_url, tlsutil.client_context(tls.ca),
                                   self._position, window_s=settings.lease_s,
                                   on_fenced=self._on_fenced, fenced=self.fenced,
                                   witness=self.witness)
            if self.witness is not None and settings.auto_promote_after is not None:
                fence = self.fence
                self.autopromote = AutoPromote(
                    self.witness, after_s=settings.auto_promote_after, lease_s=settings.lease_s,
                    peer_answers=lambda: fence.peer_state() is not None,
                    own_epoch=lambda: self._position()[1],
                    promote=lambda epoch: self._promote_claimed(epoch))
        db.set_gate(self._write_gate)
        self.lock = lock
        self.db = db
        self.ca = ca
        self.tls = tls
        self.new_admin_token = new_admin_token
        self._kick = threading.Event()
        self.lease = Lease(db, this_process(settings.listen, settings.advertised_url),
                           settings.lease_s, on_change=self._kick.set)
        # the controller's writes go through the fence (vault/controller.py)
        self.control_db = db.guarded(self.lease.guard)
        self.runner = JobRunner(self.control_db, settings)
        self.scheduler = Scheduler(self.control_db, settings)
        self.monitor = HealthMonitor(self.control_db, settings)
        self.drills = DrillScheduler(self.control_db, settings)
        self.controller = Controller(self.lease, work=self._round, on_elected=self._elected,
                                     interval_s=settings.loop_interval, kick=self._kick,
                                     min_interval_s=LOOP_MIN_S)
        self._last_health = 0.0
        self._health_every = settings.health_interval
        # long polls of the agents (the command channel) and the hook that wakes them; a job
        # created or a command ended here kicks the loop (and its waiting jobs are asked now)
        self.waiters = Waiters()
        push = CommandPush(self.waiters, self._jobs_changed, self._job_created)
        db.listen("after_flush", push.after_flush)
        db.listen("after_commit", push.after_commit)
        db.listen("after_rollback", push.after_rollback)
        # several processes on PostgreSQL: the same wake-ups across processes (LISTEN/NOTIFY)
        self.listener: notify.Listener | None = None
        if not db.sqlite:
            db.listen("after_flush", notify.after_flush)
            db.listen("before_commit", notify.BeatAnnouncer(self.waiters))
            self.listener = notify.Listener(db.url, self.waiters.wake, self._jobs_changed,
                                            self._job_created, self.waiters.want_beat)
        # the threads agent requests (heartbeats, command results, the command channel's
        # looks) may hold at once: the rest of the API's thread pool (anyio's default, 40)
        # stays free for operators whatever the agents' write load (``api/agent.py``)
        self.agent_limiter = anyio.CapacityLimiter(AGENT_THREADS_SQLITE if db.sqlite
                                                   else AGENT_THREADS)
        self.recovered: dict[str, str] = {}
        self._later: ThreadPoolExecutor | None = None
        self._later_lock = threading.Lock()

    # -- standby and promotion ---------------------------------------------------------------

    @property
    def role(self) -> str:
        return "standby" if self.standby else "active"

    @property
    def passive(self) -> bool:
        """A standby or a fenced vault: every write is refused (bookkeeping writes — audit
        rows, a token's last use — are not even tried)."""
        return self.standby or self.fenced is not None

    def active_url(self) -> str | None:
        """The active vault's URL as the (replicated) lease row names it, if any."""
        with self.db.read() as s:
            view = read_lease(s)
        url = (view.info or {}).get("url")
        return str(url) if url and view.holder is not None else None

    def _position(self) -> tuple[int | None, int]:
        """This vault's (timeline, lease epoch) as its database holds them (the timeline of a
        primary: its current WAL file's; None on SQLite or a standby)."""
        with self.db.read() as s:
            epoch = read_lease(s).epoch
            timeline: int | None = None
            if not self.db.sqlite and not self.standby:
                name = s.execute(text("SELECT pg_walfile_name(pg_current_wal_lsn())")).scalar_one()
                timeline = int(str(name)[:8], 16)
        return timeline, epoch

    def state(self) -> dict[str, object]:
        """What ``GET /vault/state`` answers: role (active, standby, fenced), timeline, epoch,
        this vault's URL.

        Read under the role lock: a promotion makes the vault active and then takes the lease
        at the new epoch, and between the two an answer "active at the old epoch" would be a
        lie the peer and the witness act on."""
        with self._role_lock:
            role = "fenced" if self.fenced is not None else self.role
            if role == "active":
                timeline, epoch = self._position()
            else:
                with self.db.read() as s:
                    timeline, epoch = None, read_lease(s).epoch
        # a standby about to claim at the witness: its answer no longer confirms the active
        candidate = (role == "standby" and self.autopromote is not None
                     and self.autopromote.candidate)
        return {"role": role, "timeline": timeline, "epoch": epoch,
                "url": self.settings.advertised_url, "peer_url": self.settings.peer_url,
                "witness_url": self.settings.witness_url, "candidate": candidate}

    def _on_fenced(self, f: Fenced) -> None:
        """The peer was promoted past this vault: keep it fenced across restarts, stop being
        the controller without writing, stop the background work."""
        self.fenced = f
        try:
            write_marker(self.settings.data_dir, f)
        except OSError as e:
            log.error("could not write the fence marker (the vault stays fenced while it "
                      "runs): %s", e)
        self.lease.step_down(f"the vault at {f.peer_url} was promoted past this one")
        threading.Thread(target=lambda: self.controller.stop(release=False), daemon=True,
                         name="drsite-vault-fenced").start()

    def _write_gate(self) -> None:
        if self.fenced is not None:
            raise self.fenced.error()
        if self.fence is not None and not self.standby:
            self.fence.admit()
        if not self.standby:
            return
        try:
            url = self.active_url()
        except Exception:  # the refusal must not fail on its own read
            url = None
        where = f"the active vault is {url}" if url else "no active vault is known"
        raise StandbyVault(f"this vault is the standby; {where}",
                           hint=(f"Send writes to {url}. " if url else "")
                           + "If the active site is lost, make this vault active with "
                             "'drsite vault promote'.")

    def _promote_claimed(self, epoch: int) -> None:
        """Rule 1: the witness granted this standby ``epoch``; promote as the operator's
        command does, the lease taken at that epoch at least."""
        self.promote(force=True, min_epoch=epoch)

    def _claim_for_operator(self) -> int:
        """An operator's promotion with a witness: record this vault as the holder at a newer
        epoch first (forced: the operator decided), so the old active is fenced by the witness
        too. Returns the epoch to take the lease at (0: the witness did not answer)."""
        assert self.witness is not None
        seen = self.witness.state()
        if seen is None:
            log.warning("promotion: the witness %s does not answer; promoting without it (the "
                        "old active is fenced by this vault's newer epoch)", self.witness.url)
            return 0
        with self.db.read() as s:
            mine = read_lease(s).epoch
        epoch = max(mine, int(seen.get("epoch") or 0)) + 1
        out = self.witness.claim(epoch, self.settings.auto_promote_after or
                                 self.settings.lease_s * 2, force=True)
        if out is None or out.get("granted") is not True:
            raise Conflict(f"the witness {self.witness.url} did not record this vault at epoch "
                           f"{epoch}: {(out or {}).get('why', 'no answer')}",
                           hint="Run 'drsite vault promote' again.")
        return epoch

    def promote(self, *, force: bool = False, min_epoch: int = 0) -> dict[str, object]:
        """See :meth:`_promote`; one promotion at a time."""
        with self._promote_lock:
            return self._promote(force=force, min_epoch=min_epoch)

    def _promote(self, *, force: bool, min_epoch: int) -> dict[str, object]:
        """Make this standby vault active: promote its database (``pg_promote()``, waiting
        until it accepts writes), then take the controller lease with a new epoch, whoever
        holds it (the old active, if it returns, is fenced by that epoch), and run the
        background work. Idempotent: on an active vault it only makes sure this process holds
        the lease. Needs a role allowed to call ``pg_promote`` (a superuser, or GRANT EXECUTE).

        While the peer vault answers as the active one, refused (``Conflict``) unless
        ``force``: promoting then fences a live vault, and what it writes until it notices
        (at most ``lease_s / 3``) is lost — a planned switchover, not a disaster."""
        if self.db.sqlite:
            raise PermanentError("a vault on SQLite has no standby to promote",
                                 hint="Vault pairs run on PostgreSQL (see README, production "
                                      "layout).")
        if self.standby and not force and self.fence is not None:
            peer = self.fence.peer_state()
            if peer is not None and peer.get("role") == "active":
                raise Conflict(f"the active vault at {self.fence.peer_url} answers: promoting "
                               "this one fences it, and what it writes until it notices is "
                               "lost",
                               hint="Promote only when the active site is lost or cut off "
                                    "(its agents included); for a planned switchover, 'drsite "
                                    "vault promote --force'.")
        if self.standby and self.witness is not None and min_epoch == 0:
            min_epoch = self._claim_for_operator()
        promoted_db = False
        if self.db.in_recovery():
            try:
                with self.db.engine.connect() as conn:
                    ok = conn.execute(text("SELECT pg_promote(true, :t)"),
                                      {"t": PROMOTE_TIMEOUT_S}).scalar_one()
                    conn.commit()
            except DBAPIError as e:
                raise PermanentError(
                    f"PostgreSQL refused to promote: {str(e.orig).strip().splitlines()[0]}",
                    hint="Let the vault's database role promote (GRANT EXECUTE ON FUNCTION "
                         "pg_promote(boolean, integer) TO that role), or promote the database "
                         "yourself (pg_ctl promote): the vault notices within a second.") from e
            if not ok or self.db.in_recovery():
                raise PermanentError("PostgreSQL did not finish its promotion in "
                                     f"{PROMOTE_TIMEOUT_S} s",
                                     hint="See the PostgreSQL server's log, then run 'drsite "
                                          "vault promote' again.")
            promoted_db = True
        self._become_active(force=True, min_epoch=min_epoch)
        view = self.lease.view()
        log.warning("vault promoted: this process holds the controller lease at epoch %d",
                    view.epoch)
        return {"role": self.role, "epoch": view.epoch, "database_promoted": promoted_db,
                "controller": self.lease.held}

    def _become_active(self, *, force: bool, min_epoch: int = 0) -> None:
        with self._role_lock:
            was_standby = self.standby
            if was_standby:
                self._check_schema()
                self.standby = False
                log.warning("this vault's database accepts writes: the vault is active now")
            if force:
                self.lease.step(force=True, min_epoch=min_epoch)
            if was_standby and self._started:
                self._run_active()

    def _check_schema(self) -> None:
        current, head = schema_revision(self.db.engine)
        if current != head:
            raise PermanentError(f"the database's schema is at revision {current}, this vault "
                                 f"needs {head}",
                                 hint="Run the same drsite version on both vaults.")

    def _watch_role(self) -> None:
        while not self._role_stop.wait(ROLE_POLL_S):
            if not self.standby:
                return
            try:
                if not self.db.in_recovery():
                    self._become_active(force=False)
                    return
            except Exception as e:  # the database restarting: look again
                log.warning("standby vault: cannot read the database's role: %s",
                            type(e).__name__)
                continue
            if self.autopromote is not None and self.fenced is None:
                if not self._promote_lock.acquire(blocking=False):
                    continue   # an operator's promotion runs: look again after it
                try:
                    if not self.standby:
                        return   # it made this vault active
                    if self.autopromote.step():
                        return
                except Exception:  # a failed attempt: the next look tries again
                    log.exception("automatic promotion failed; trying again")
                finally:
                    self._promote_lock.release()

    def _run_active(self) -> None:
        if self.fenced is not None:
            log.error("this vault is fenced (%s): it runs no background work and writes "
                      "nothing; make it a standby with 'drsite vault rejoin'",
                      self.fenced.error().message)
            return
        if self.fence is not None:
            self.fence.start()
        if self.listener is not None:
            self.listener.start()
        if self.settings.background:
            self.controller.start()
            return
        self.lease.step()
        self.controller.ensure_elected()

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` soon in this process's one bookkeeping thread, off the request path (a
        token's ``last_used_at``: a GET must not queue for the write lock). Best effort: an
        error is logged."""
        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("deferred bookkeeping write failed")

        with self._later_lock:
            if self._later is None:
                self._later = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drsite-later")
            self._later.submit(run)

    def tick(self) -> None:
        """One round of the background work, all of it (tests: no background thread): jobs,
        the scheduler, health. Takes the controller lease first if this process does not hold
        it (``NotController`` when another live process does)."""
        if not self.lease.held:
            self.lease.step()
        if not self.controller.ensure_elected():
            raise NotController("another vault process holds the controller lease",
                                hint="Stop it, or wait until its lease expires.")
        self.runner.tick()
        self.scheduler.tick()
        self.drills.tick()
        self.monitor.tick()

    @property
    def push_poll_s(self) -> float:
        """How often a waiting long poll looks at the commands table: rarely when every writer
        wakes it — SQLite (one process: its own commits do), or PostgreSQL while notifications
        arrive — else every second."""
        if self.listener is None or self.listener.listening.is_set():
            return notify.POLL_WITH_NOTIFY_S
        return PUSH_POLL_S

    def _jobs_changed(self, ended: Ended | None = None) -> None:
        """Commands ended (``ended``: their jobs and items; None: any job may care)."""
        if ended is None:
            self.runner.wake()
        else:
            self.runner.wake(jobs=ended[0], items=ended[1])
        self._kick.set()

    def _job_created(self) -> None:
        self.runner.wake(new_job=True)
        self._kick.set()

    def _elected(self) -> None:
        """A new term: resume or fail the jobs a previous controller (or process) left."""
        self.recovered = self.runner.recover()

    def _round(self) -> None:
        # jobs and the scheduler run every loop_interval; health (a pass over every item) at
        # most every health_interval, and a quarter of the time at most (HEALTH_REST_FACTOR):
        # alerts do not need 0.25 s. The job runner has a time
        # budget per round, so thousands of jobs never delay the scheduler's cycles.
        self.runner.tick(budget_s=RUNNER_BUDGET_S)
        self.scheduler.tick()
        self.drills.tick()
        if time.monotonic() - self._last_health >= self._health_every:
            t0 = time.monotonic()
            self.monitor.tick()
            self._last_health = time.monotonic()
            self._health_every = max(self.settings.health_interval,
                                     HEALTH_REST_FACTOR * (self._last_health - t0))

    def start(self) -> None:
        """Seek the controller lease and, while holding it, run the background work (first
        resuming or failing the jobs a previous controller left). Without ``background``
        (tests) the lease is taken now and ``tick()`` does the rounds. A standby runs none of
        it: it watches its database and starts them when the database is promoted."""
        with self._role_lock:
            self._started = True
            if not self.standby:
                self._run_active()
                return
        self._role_stop.clear()
        self._role_thread = threading.Thread(target=self._watch_role, daemon=True,
                                             name="drsite-vault-role")
        self._role_thread.start()

    def stop(self) -> None:
        """Stop the background work and release the controller lease."""
        self._role_stop.set()
        if self.fence is not None:
            self.fence.stop()
        if self._role_thread is not None:
            self._role_thread.join(timeout=10)
            self._role_thread = None
        self.controller.stop()
        if self.listener is not None:
            self.listener.stop()

    def close(self) -> None:
        self.stop()
        with self._later_lock:
            if self._later is not None:
                self._later.shutdown(wait=True)
                self._later = None
        self.db.dispose()
        if self.lock is not None:
            self.lock.release()


def bootstrap(settings: VaultSettings) -> Vault:
    """Prepare ``settings.data_dir`` (modes, CA, server certificate, schema, master key, first
    admin token)."""
    masterkey.private_dir(settings.data_dir)
    masterkey.fix_modes(settings.data_dir)
    lock = masterkey.DataDirLock(settings.data_dir, exclusive=False)
    db: Database | None = None
    try:
        masterkey.private_sqlite_file(settings.database_url)
        db = Database(settings.database_url, idle_in_tx_s=settings.idle_in_tx_s)
        standby = db.in_recovery()
        if standby:
            _check_standby(db, settings)
        else:
            db.migrate()
        ring = masterkey.open_keyring(db, settings.master_key_path)
        attach_sealer(db.engine, ring)
        if not standby:
            masterkey.seal_clear_values(db, ring)
        ca = sync_ca(db, settings.pki_dir, settings.clock.now(), writable=not standby)
        tls = ensure_server_cert(ca, settings.pki_dir)
        token = None if standby else ensure_admin_token(db, settings.data_dir,
                                                        settings.clock.now())
        masterkey.fix_modes(settings.data_dir)  # what the steps above created (CA cert: 0644)
    except BaseException:
        if db is not None:
            db.dispose()
        lock.release()
        raise
    if standby:
        log.info("the database is a hot standby: this vault is the standby (reads only)")
    return Vault(settings, db, ca, tls, token, lock, standby=standby)


def _check_standby(db: Database, settings: VaultSettings) -> None:
    """A standby writes nothing at start: its schema must be the code's (the active vault
    migrates the primary), and it needs the active vault's master key (it cannot make one)."""
    current, head = schema_revision(db.engine)
    if current != head:
        raise PermanentError(f"the standby's database is at schema revision {current}, this "
                             f"vault needs {head}",
                             hint="Start the active vault with this drsite version first (it "
                                  "migrates the primary database), then this standby.")
    if masterkey.load_keyring(settings.master_key_path) is None:
        raise SecretUnreadable(f"a standby vault needs the active vault's master key, and "
                               f"{settings.master_key_path} does not exist",
                               hint="Copy the active vault's master key file here (mode 0600) "
                                    "or pass --master-key-file.")


def attach(settings: VaultSettings) -> Vault:
    """Open a data directory :func:`bootstrap` prepared (a worker process of ``vault serve
    --workers N``): the CA, the server certificate, the database (no migration) and the master
    key; nothing is created. Holds ``DATA/vault.lock`` shared, like every vault process."""
    lock = masterkey.DataDirLock(settings.data_dir, exclusive=False)
    db: Database | None = None
    try:
        db = Database(settings.database_url, idle_in_tx_s=settings.idle_in_tx_s)
        standby = db.in_recovery()
        ring = masterkey.open_keyring(db, settings.master_key_path)
        attach_sealer(db.engine, ring)
        ca = sync_ca(db, settings.pki_dir, settings.clock.now(), writable=False)
        tls = ensure_server_cert(ca, settings.pki_dir)
    except BaseException:
        if db is not None:
            db.dispose()
        lock.release()
        raise
    return Vault(settings, db, ca, tls, None, lock, standby=standby)
