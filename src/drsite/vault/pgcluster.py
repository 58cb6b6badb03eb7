"""A PostgreSQL cluster that drsite runs itself on loopback, for a vault pair (issue 14): the
active vault's database (primary) and the standby vault's (a hot standby by streaming
replication from a replication slot), promotion and rejoin.

Layout of a cluster directory ``DIR``: ``DIR/data`` (the cluster, ``initdb``), ``DIR/sock``
(unix socket), ``DIR/postgres.log``. Our settings live in ``DIR/data/drsite.conf``, included by
``postgresql.conf``; a base backup copies the primary's, so a standby rewrites it with its own
port. Servers listen on 127.0.0.1 only; authentication is ``trust`` on loopback and the unix
socket (the demo and test layout: a production pair runs PostgreSQL as its operator sets it
up, with passwords or certificates, and gives ``vault serve --db`` its URL). Run as root, the
server runs as the ``postgres`` user (``initdb`` refuses root).

Responsible for: creating, starting, stopping, promoting and rewinding one local cluster
(Debian's server binaries: ``initdb``, ``pg_ctl``, ``pg_basebackup``, ``pg_rewind``), and each
step being idempotent (a cluster already created, started or promoted is left as it is). Not
responsible for: what the vault stores in it, or which vault is active (``controller.py``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from drsite.core.errors import InvalidInput, NetworkError, PermanentError

BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)
DATABASE = "drsite"
CONF = "drsite.conf"
START_TIMEOUT_S = 60


def find_bindir() -> Path:
    """The directory of the PostgreSQL server binaries (newest version first)."""
    for pattern in BIN_GLOBS:
        for d in sorted(glob.glob(pattern), reverse=True):
            if all((Path(d) / b).exists() for b in ("initdb", "pg_ctl", "pg_basebackup")):
                return Path(d)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PermanentError("PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found",
                         hint="Install PostgreSQL (Debian: apt-get install postgresql).")


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(user)
    raise PermanentError("running as root, and neither a 'postgres' nor a 'nobody' user exists "
                         "to run PostgreSQL as", hint="Create a 'postgres' user, or run as one.")


@dataclass(frozen=True)
class LocalCluster:
    """One cluster in ``directory`` serving 127.0.0.1:``port``."""

    directory: Path
    port: int
    bindir: Path | None = None

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def sock(self) -> Path:
        return self.directory / "sock"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        """The SQLAlchemy URL ``vault serve --db`` takes."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _conninfo(self, database: str = "postgres") -> str:
        return _conninfo(self.port, database)

    # -- running the binaries ------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str((self.bindir or find_bindir()) / name)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = _run_as()
        demote: dict[str, Any] = ({} if user is None else
                                  {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []})
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGCONNECT_TIMEOUT": "10"}
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=env,
                              cwd=self.directory, check=False, **demote)
        if check and proc.returncode != 0:
            raise PermanentError(f"{Path(argv[0]).name} failed ({proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-1500:]}",
                                 hint=f"See {self.log} and the message; fix, then run the "
                                      "same drsite command again.")
        return proc

    def _prepare_dirs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sock.mkdir(exist_ok=True, mode=0o700)
        user = _run_as()
        if user is not None:
            for p in (self.directory, self.sock):
                os.chown(p, user.pw_uid, user.pw_gid)
            if self.log.exists():
                os.chown(self.log, user.pw_uid, user.pw_gid)

    def _write_conf(self) -> None:
        """Our settings (port, loopback, replication, what pg_rewind needs); rewritten at each
        start, so a base backup's copy of the primary's never stays."""
        conf = "\n".join([
            "# written by drsite (vault/pgcluster.py); rewritten at every start",
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.sock}'",
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
            "hot_standby_feedback = on",
            "wal_log_hints = on",  # pg_rewind needs it (or data checksums)
            "wal_keep_size = 256",  # MB: pg_rewind reads the old primary's WAL back to the fork
            "max_connections = 200",
            "",
        ])
        path = self.data / CONF
        path.write_text(conf)
        main = self.data / "postgresql.conf"
        text = main.read_text()
        if f"include_if_exists = '{CONF}'" not in text:
            main.write_text(text + f"\ninclude_if_exists = '{CONF}'\n")
        user = _run_as()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def exists(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    # -- the steps -------------------------------------------------------------------------------

    def init_primary(self) -> None:
        """Create a primary cluster with the ``drsite`` database (idempotent), and start it."""
        self._prepare_dirs()
        if not self.exists:
            if self.data.exists():
                shutil.rmtree(self.data)  # an initdb that did not finish
            self._run(self._bin("initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust", "--encoding=UTF8")
        self.start()
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (DATABASE,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def create_slot(self, slot: str) -> None:
        """A replication slot on this (primary) cluster (:func:`create_slot`)."""
        create_slot(self.port, slot)

    def drop_slot(self, slot: str) -> None:
        _check_slot(slot)
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                            (slot,)).fetchone() is not None:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))

    def init_standby(self, primary_port: int, slot: str) -> None:
        """Make this cluster a hot standby of the primary at 127.0.0.1:``primary_port`` (a base
        backup streaming from the replication ``slot``, created there if missing), and start
        it. Idempotent: an existing cluster is only started."""
        _check_slot(slot)
        self._prepare_dirs()
        if not self.exists:
            create_slot(primary_port, slot)
            if self.data.exists():
                shutil.rmtree(self.data)  # a base backup that did not finish
            self._run(self._bin("pg_basebackup"), "-D", str(self.data), "-h", "127.0.0.1",
                      "-p", str(primary_port), "-U", "postgres", "-X", "stream", "-S", slot,
                      "-R", "--checkpoint=fast")
        self.start()

    def start(self) -> None:
        """Start the server (idempotent) and wait until it accepts connections."""
        self._prepare_dirs()
        if not self.exists:
            raise InvalidInput(f"no PostgreSQL cluster in {self.data}",
                               hint="Check the directory: 'drsite up --ha' keeps its "
                                    "clusters in DIR/pg/primary and DIR/pg/secondary.")
        self._write_conf()
        if self.pid() is None:
            self._run(self._bin("pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                      "-w", "-t", str(START_TIMEOUT_S), "-o", f"-p {self.port}")
        self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self._conninfo(), autocommit=True):
                    return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise NetworkError(f"PostgreSQL on port {self.port} does not accept "
                                       f"connections: {e}", hint=f"See {self.log}.") from e
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (idempotent)."""
        if mode not in ("smart", "fast", "immediate"):
            raise InvalidInput(f"unknown stop mode {mode!r}")
        if self.exists and self.pid() is not None:
            self._run(self._bin("pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w",
                      check=False)

    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def checkpoint(self) -> None:
        checkpoint(self.port)

    def in_recovery(self) -> bool:
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def promote(self) -> None:
        """End recovery: this standby becomes a primary on a new timeline (idempotent)."""
        if self.in_recovery():
            self._run(self._bin("pg_ctl"), "promote", "-D", str(self.data), "-w",
                      "-t", str(START_TIMEOUT_S))
        self.checkpoint()  # the control file names the new timeline (pg_rewind reads it)

    def rejoin(self, primary_port: int, slot: str) -> str:
        """Make this cluster (an old primary) a standby of the primary at
        127.0.0.1:``primary_port`` again: stop it,
        ``pg_rewind`` it onto the new primary's timeline (its writes after the fork are
        discarded), or, when rewinding fails, a fresh base backup; then start it streaming from
        ``slot``. Returns how (``rewind`` or ``basebackup``)."""
        _check_slot(slot)
        self.stop("fast")
        create_slot(primary_port, slot)
        # pg_rewind reads the source's timeline from its control file, which a promotion updates
        # only at its next checkpoint: without one it finds "no rewind required" and the old
        # primary keeps the writes it made after the fork
        checkpoint(primary_port)
        how = "rewind"
        if self.exists:
            rewound = self._run(self._bin("pg_rewind"), "--target-pgdata", str(self.data),
                                "--source-server",
                                _conninfo(primary_port),
                                "--write-recovery-conf", check=False)
            if rewound.returncode != 0:
                how = "basebackup"
        else:
            how = "basebackup"
        if how == "basebackup":
            if self.data.exists():
                aside = self.directory / f"data.old-{int(time.time())}"
                self.data.rename(aside)
            self.init_standby(primary_port, slot)
            return how
        # pg_rewind -R wrote primary_conninfo; stream from our slot too
        with (self.data / "postgresql.auto.conf").open("a") as f:
            f.write(f"primary_slot_name = '{slot}'\n")
        (self.data / "standby.signal").touch()
        self.start()
        return how


def _conninfo(port: int, database: str = "postgres") -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname={database} connect_timeout=5"


def create_slot(port: int, slot: str) -> None:
    """A physical replication slot on the primary at 127.0.0.1:``port`` (idempotent): WAL the
    standby has not received is kept for it, however long it is away."""
    _check_slot(slot)
    with psycopg.connect(_conninfo(port), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone() is None:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))


def checkpoint(port: int) -> None:
    with psycopg.connect(_conninfo(port), autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def _check_slot(slot: str) -> None:
    if not slot or len(slot) > 63 or not all(c.islower() or c.isdigit() or c == "_" for c in slot):
        raise InvalidInput(f"invalid replication slot name {slot!r}",
                           hint="Use lower-case letters, digits and '_' (at most 63).")
