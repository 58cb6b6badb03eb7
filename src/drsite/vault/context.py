"""One running vault: its settings, database, CA, job runner, scheduler and health monitor, and
the background loop that drives the last three.

:func:`bootstrap` prepares a data directory (idempotent): private modes (the directory 0700,
every file in it 0600, also in older deployments), the CA in ``DATA/pki``, the HTTPS server
certificate (SAN localhost, 127.0.0.1), the database schema (``alembic upgrade head``), the
master key that seals secrets in the database (``vault/masterkey.py``; values still in clear are
sealed) and, at first start only, the admin token in ``DATA/admin.token`` (mode 0600). A running
vault holds ``DATA/vault.lock`` shared (a master-key rotation needs it exclusively).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from drsite.fsutil import atomic_write_bytes
from drsite.pki import CertificateAuthority
from drsite.vault import masterkey
from drsite.vault.audit import record_event
from drsite.vault.auth import ADMIN_TOKEN_NAME, Role, create_token
from drsite.vault.db.database import Database
from drsite.vault.db.models import ApiToken
from drsite.vault.db.sealed import attach_sealer
from drsite.vault.drills import DrillScheduler
from drsite.vault.health import HealthMonitor
from drsite.vault.jobs.runner import JobRunner
from drsite.vault.push import CommandPush, Waiters
from drsite.vault.scheduler import Scheduler
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"


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


class Vault:
    """Everything one vault process holds. Built by :func:`bootstrap`."""

    def __init__(self, settings: VaultSettings, db: Database, ca: CertificateAuthority,
                 tls: TlsFiles, new_admin_token: str | None,
                 lock: masterkey.DataDirLock | None = None) -> None:
        self.settings = settings
        self.lock = lock
        self.db = db
        self.ca = ca
        self.tls = tls
        self.new_admin_token = new_admin_token
        self.runner = JobRunner(db, settings)
        self.scheduler = Scheduler(db, settings)
        self.monitor = HealthMonitor(db, settings)
        self.drills = DrillScheduler(db, settings)
        self._stop = threading.Event()
        self._kick = threading.Event()
        # long polls of the agents (the command channel) and the hook that wakes them
        self.waiters = Waiters()
        push = CommandPush(self.waiters, self._kick.set)
        db.listen("after_flush", push.after_flush)
        db.listen("after_commit", push.after_commit)
        db.listen("after_rollback", push.after_rollback)
        self._thread: threading.Thread | None = None
        self.recovered: dict[str, str] = {}

    def tick(self) -> None:
        """One round of the background work: jobs, then the scheduler, then health."""
        self.runner.tick()
        self.scheduler.tick()
        self.drills.tick()
        self.monitor.tick()

    def start(self) -> None:
        """Resume or fail jobs left by a previous process, then start the background loop."""
        self.recovered = self.runner.recover()
        if self.settings.background and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="drsite-vault-loop", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.db.dispose()
        if self.lock is not None:
            self.lock.release()

    def _loop(self) -> None:
        # jobs and the scheduler run every loop_interval; health (a pass over every item that
        # holds the write lock) at most every health_interval: alerts do not need 0.5 s
        last_health = 0.0
        while not self._stop.is_set():
            try:
                self.runner.tick()
                self.scheduler.tick()
                self.drills.tick()
                if time.monotonic() - last_health >= self.settings.health_interval:
                    self.monitor.tick()
                    last_health = time.monotonic()
            except Exception:  # keep the vault alive; the next tick tries again
                log.exception("vault background loop failed; retrying")
            # the next round after loop_interval, or at once when a job was created or a
            # command ended (a job waits for it), but not more than every LOOP_MIN_S
            self._stop.wait(LOOP_MIN_S)
            self._kick.wait(max(0.0, self.settings.loop_interval - LOOP_MIN_S))
            self._kick.clear()


def bootstrap(settings: VaultSettings) -> Vault:
    """Prepare ``settings.data_dir`` (modes, CA, server certificate, schema, master key, first
    admin token)."""
    masterkey.private_dir(settings.data_dir)
    masterkey.fix_modes(settings.data_dir)
    lock = masterkey.DataDirLock(settings.data_dir, exclusive=False)
    db: Database | None = None
    try:
        ca = CertificateAuthority.load_or_create(settings.pki_dir)
        tls = ensure_server_cert(ca, settings.pki_dir)
        masterkey.private_sqlite_file(settings.database_url)
        db = Database(settings.database_url)
        db.migrate()
        ring = masterkey.open_keyring(db, settings.master_key_path)
        attach_sealer(db.engine, ring)
        masterkey.seal_clear_values(db, ring)
        token = ensure_admin_token(db, settings.data_dir, settings.clock.now())
        masterkey.fix_modes(settings.data_dir)  # what the steps above created (CA cert: 0644)
    except BaseException:
        if db is not None:
            db.dispose()
        lock.release()
        raise
    return Vault(settings, db, ca, tls, token, lock)
