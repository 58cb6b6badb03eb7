"""A throw-away PostgreSQL cluster for tests (Debian's server binaries, no service needed).

``postgres_cluster()`` runs ``initdb`` in a temp dir and starts ``postgres`` on 127.0.0.1 at a
free port (unix socket in the temp dir), yields its base URL and removes everything afterwards.
As root it runs the server as the ``postgres`` user (``initdb`` refuses root), falling back to
``nobody``. ``fresh_database(url)`` creates an empty database and returns its URL.

Pytest fixtures: ``pg_server`` (session) and ``pg_url`` (a fresh database per test). They run
when ``DRSITE_TEST_PG=1`` or when the binaries exist; they skip with the reason when the
binaries are missing (``DRSITE_TEST_PG=1`` turns that skip into a failure; ``=0`` skips).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drsite.vault.db.database import sqlite_url
from drsite.vault.testing import Harness

BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)


def find_bindir() -> Path | None:
    for pattern in BIN_GLOBS:
        for d in sorted(glob.glob(pattern), reverse=True):
            if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
                return Path(d)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(user)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _demote(user: pwd.struct_passwd | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def postgres_cluster(bindir: Path | None = None, settings: tuple[str, ...] = ()) -> Iterator[str]:
    """Start a cluster; yields ``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres``.
    ``settings``: more ``name=value`` server settings (``-c``), e.g. a preloaded library."""
    bindir = bindir or find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found")
    user = _run_as()
    tmp = Path(tempfile.mkdtemp(prefix="drsite-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    if user is not None:
        for p in (tmp, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, env=env,
                       cwd=tmp, **_demote(user))  # type: ignore[call-overload]
        port = _free_port()
        log = open(tmp / "postgres.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
             "-k", str(sock), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200",
             *(x for kv in settings for x in ("-c", kv))],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, **_demote(user))  # type: ignore[call-overload]
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        _wait_ready(port, proc, tmp / "postgres.log")
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {logfile.read_text(errors='replace')[-2000:]}")
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                                 connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def fresh_database(server_url: str) -> str:
    """Create an empty database on the cluster at ``server_url``; returns its SQLAlchemy URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def pg_wanted() -> tuple[bool, str]:
    """(run?, reason) for PostgreSQL tests on this machine."""
    flag = os.environ.get("DRSITE_TEST_PG")
    if flag == "0":
        return False, "DRSITE_TEST_PG=0"
    if find_bindir() is None:
        if flag == "1":
            pytest.fail("DRSITE_TEST_PG=1 but the PostgreSQL server binaries (initdb, postgres) "
                        "are not installed")
        return False, ("PostgreSQL server binaries (initdb, postgres) not found: install Debian's "
                       "postgresql package, or set DRSITE_TEST_PG=0 to silence this")
    return True, ""


def require_pg() -> None:
    """Skip the calling test (or fixture) unless PostgreSQL tests run here (:func:`pg_wanted`)."""
    run, reason = pg_wanted()
    if not run:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    require_pg()
    with postgres_cluster() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    return fresh_database(pg_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database's URL: every test using it runs on SQLite (a file in
    ``tmp_path``) and on PostgreSQL (a new database of the session's server)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return sqlite_url(tmp_path / "vault.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def vault_harnesses(request: pytest.FixtureRequest,
                    tmp_path: Path) -> Iterator[Callable[[str], Harness]]:
    """Makes vaults, each on a database of its own (SQLite, or a fresh PostgreSQL database of
    the session's server): every test using it runs on both engines."""
    server = request.getfixturevalue("pg_server") if request.param == "postgresql" else None
    made: list[Harness] = []

    def make(name: str) -> Harness:
        made.append(Harness(tmp_path / name, fresh_database(server) if server else None))
        return made[-1]

    yield make
    for hh in made:
        hh.close()
