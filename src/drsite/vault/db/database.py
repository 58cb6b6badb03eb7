"""Engine, sessions and migrations of the vault's database (SQLite file or PostgreSQL).

Responsible for: building the engine for a URL (SQLite in WAL mode with immediate write
transactions, so concurrent API threads and the background loop never dead-lock), running the
Alembic migrations programmatically (``upgrade head``), and handing out transactions: ``tx()``
for writes (``BEGIN IMMEDIATE`` on SQLite), ``read()`` for reads (deferred ``BEGIN``: WAL
readers run beside the writer). On SQLite the writers of one process also queue, first come
first served, on a lock of their own before ``BEGIN IMMEDIATE`` (:class:`FairLock`): SQLite's
busy handler polls with sleeps of up to 100 ms and favours no one, so under load a heartbeat
waited seconds for a lock that was free most of the time. A guarded view (:meth:`guarded`)
runs a check at the start of each of its write transactions (the controller's epoch fence).
Not responsible for: what is written (callers).
"""

from __future__ import annotations

import copy
import json
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as SaTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from drsite.vault.db.groupcommit import GroupCommit

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
T = TypeVar("T")


# connections: API worker threads (anyio's default limit is 40) + the background loop + slack
POOL_SIZE = 16
POOL_OVERFLOW = 34
READ_ONLY = "drsite_read_only"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` of a JSON column's value, with the values most rows hold — an empty
    object, an empty list (an item's ``retry`` and ``health_reasons`` while it is healthy) —
    made without the decoder: the controller's passes decode thousands of them per pass. Each
    call returns a new object, as ``json.loads`` does (a caller may change what it got)."""
    if text == "{}" or text == b"{}":
        return {}
    if text == "[]" or text == b"[]":
        return []
    return json.loads(text)


def make_engine(url: str, *, idle_in_tx_s: float | None = None) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE``.
    PostgreSQL sessions that sit idle inside a transaction for ``idle_in_tx_s`` are ended by the
    server (a stopped process must not hold its row locks, the controller lease's included,
    for ever)."""
    if url.startswith("sqlite"):
        # the pool is larger than the API's worker threads (anyio's default limit: 40) plus the
        # background loop, so a thread never waits for a connection, only for the write lock
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                               json_deserializer=loads_json)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # read transactions take a deferred BEGIN: in WAL mode a reader neither waits for
            # nor blocks the writer; write transactions take the write lock up front
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    args: dict[str, Any] = {}
    if idle_in_tx_s is not None and url.startswith("postgresql"):
        args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_in_tx_s * 1000)}"
    # no pre-ping (a round trip per transaction): a pooled connection the server ended while
    # it sat in the pool is found at checkout by a look at its socket instead (:func:`_ended`)
    # and replaced; one that dies during a transaction fails that transaction (transient: the
    # API answers 503 with Retry-After, :func:`transient_db_error`), and SQLAlchemy then
    # replaces every pooled connection older than the failure
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                           connect_args=args, json_deserializer=loads_json)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if _ended(dbapi_conn):
            raise DisconnectionError("the server ended this pooled connection")  # pool retries

    return engine


def _ended(dbapi_conn: Any) -> bool:
    """Whether the server ended an idle pooled PostgreSQL connection, without a round trip:
    the connection is closed, or its socket is readable — an idle connection of the pool
    (none LISTENs) hears from the server only when it ends the session (its FATAL message:
    restart, ``pg_terminate_backend``, a timeout)."""
    if getattr(dbapi_conn, "closed", False):
        return True
    try:
        readable, _w, _x = select.select([dbapi_conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# SQLSTATE classes of PostgreSQL errors worth a retry: connection exception, transaction
# rollback (serialization failure, deadlock), insufficient resources (too many connections),
# operator intervention (shutdown, statement timeout); and lock not available
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")
TRANSIENT_SQLSTATES = ("55P03", "25P03")


def transient_db_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the database failing for the moment (a retry may succeed), not a
    bug: a lost or ended connection, a serialization failure or deadlock, too many
    connections, a shutdown, a busy SQLite file, the pool out of connections."""
    if isinstance(exc, SaTimeoutError):
        return True   # QueuePool: no connection free within the pool's timeout
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str):
        return state[:2] in TRANSIENT_SQLSTATE_CLASSES or state in TRANSIENT_SQLSTATES
    if not isinstance(exc, OperationalError):
        return False
    if hasattr(orig, "sqlstate"):
        return True   # psycopg: an operational error without a SQLSTATE is a broken connection
    msg = str(orig).lower()
    return "database is locked" in msg or "database is busy" in msg   # SQLite


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


class FairLock:
    """A re-entrant lock granted in arrival order (``threading.RLock`` favours whoever runs
    next, so a thread that re-acquires in a loop — the job runner, one transaction per job —
    could keep the others out). A release hands the lock straight to the oldest waiter."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._queue: deque[tuple[int, threading.Lock]] = deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:
                self._owner, self._depth = me, 1
                return
            gate = threading.Lock()
            gate.acquire()
            self._queue.append((me, gate))
        gate.acquire()  # the previous owner made us the owner, then opened the gate

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a FairLock this thread does not hold")
            self._depth -= 1
            if self._depth:
                return
            if self._queue:
                nxt, gate = self._queue.popleft()
                self._owner, self._depth = nxt, 1
                gate.release()
            else:
                self._owner = None

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def alembic_config(connection: Any | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (``alembic upgrade head``)."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")


def schema_revision(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's revision, the newest this code knows), read without writing."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


Guard = Callable[[Session], None]
Gate = Callable[[], None]


class Database:
    """The vault's engine plus a session factory. ``tx()`` is one transaction: committed when
    the block ends, rolled back when it raises (so a refused request changes nothing)."""

    def __init__(self, url: str, *, idle_in_tx_s: float | None = None) -> None:
        self.url = url
        self.engine = make_engine(url, idle_in_tx_s=idle_in_tx_s)
        self.sqlite = is_sqlite(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}),
                                           expire_on_commit=False)
        # PostgreSQL: reads without a transaction (no BEGIN, no ROLLBACK: two round trips of
        # the three a one-statement read cost); SQLite: the read transactions above
        self._loose_sessions = self._read_sessions if self.sqlite else sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
        # one process's SQLite writers queue here, in order, instead of in the busy handler
        self._writers: FairLock | _NoLock = FairLock() if self.sqlite else _NoLock()
        self._guard: Guard | None = None
        self._gate: Gate | None = None
        self._listeners: list[tuple[str, Any]] = []   # shared with the guarded views
        self._group = GroupCommit(self.tx)

    def set_gate(self, gate: Gate) -> None:
        """``gate()`` runs before every write transaction (``tx()``) of this database and of
        the guarded views made after this call; it raises to refuse the write before anything
        starts (a standby vault: ``StandbyVault``)."""
        self._gate = gate

    def in_recovery(self) -> bool:
        """Whether the database is a hot standby (PostgreSQL in recovery: reads only)."""
        if self.sqlite:
            return False
        with self.engine.connect() as conn:
            return bool(conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one())

    def guarded(self, guard: Guard) -> Database:
        """The same database (engine, sessions, writer queue) whose write transactions first
        call ``guard(session)``: it raises to refuse the transaction before anything is
        written (the controller's fence: ``vault/controller.py``)."""
        view = copy.copy(self)
        view._guard = guard
        view._group = GroupCommit(view.tx)   # its batches pass its guard
        return view

    def batched(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in a write transaction, on SQLite shared with the calls that
        queued while the previous one ran (one commit for all: ``groupcommit.py``; ``fn``
        must be safe to run again and see the calls before it through the session). On
        PostgreSQL, which
        writes from many connections at once, its own ``tx()``."""
        if not self.sqlite:
            with self.tx() as s:
                return fn(s)
        return self._group.run(fn)

    def migrate(self) -> None:
        upgrade(self.engine)

    def listen(self, name: str, fn: Any) -> None:
        """Hook ``fn`` to a session event (``after_flush``, ``after_commit``, ...) of the write
        sessions (``tx()``)."""
        event.listen(self._sessions, name, fn)
        self._listeners.append((name, fn))

    @contextmanager
    def tx(self) -> Iterator[Session]:
        if self._gate is not None:
            self._gate()
        with self._writers, self._sessions() as s, s.begin():
            if self._guard is not None:
                self._guard(s)
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction (a consistent snapshot), never committed: on SQLite a deferred
        ``BEGIN`` so it does not queue behind the writer. Objects stay readable after the
        block (detached); changes made to them are discarded."""
        with self._read_sessions() as s:
            try:
                yield s
            finally:
                s.rollback()

    @contextmanager
    def read_loose(self) -> Iterator[Session]:
        """Reads that need no snapshot across their statements (each statement sees what was
        committed when it ran): a token check, a health summary. On PostgreSQL no transaction
        at all (autocommit: no BEGIN and ROLLBACK round trips); on SQLite :meth:`read`. Never
        for a decision that must see its rows consistently (the scheduler, a job step)."""
        with self._loose_sessions() as s:
            try:
                yield s
            finally:
                s.rollback()

    def dispose(self) -> None:
        """Close the pool's connections and unhook the session listeners: SQLAlchemy keeps
        a sessionmaker's listeners in a class-level registry (weakly keyed by the
        sessionmaker's session class, which the listener's owner holds), so a listener left
        hooked keeps its vault, engine and caches alive for the life of the process."""
        while self._listeners:
            name, fn = self._listeners.pop()
            event.remove(self._sessions, name, fn)
        self.engine.dispose()
