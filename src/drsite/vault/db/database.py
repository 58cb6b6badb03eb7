"""Engine, sessions and migrations of the vault's database (SQLite file or PostgreSQL).

Responsible for: building the engine for a URL (SQLite in WAL mode with immediate write
transactions, so concurrent API threads and the background loop never dead-lock), running the
Alembic migrations programmatically (``upgrade head``), and handing out transactions: ``tx()``
for writes (``BEGIN IMMEDIATE`` on SQLite), ``read()`` for reads (deferred ``BEGIN``: WAL
readers run beside the writer).
Not responsible for: what is written (callers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


# connections: API worker threads (anyio's default limit is 40) + the background loop + slack
POOL_SIZE = 16
POOL_OVERFLOW = 34
READ_ONLY = "drsite_read_only"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE``."""
    if url.startswith("sqlite"):
        # the pool is larger than the API's worker threads (anyio's default limit: 40) plus the
        # background loop, so a thread never waits for a connection, only for the write lock
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)

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
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)


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


class Database:
    """The vault's engine plus a session factory. ``tx()`` is one transaction: committed when
    the block ends, rolled back when it raises (so a refused request changes nothing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}),
                                           expire_on_commit=False)

    def migrate(self) -> None:
        upgrade(self.engine)

    def listen(self, name: str, fn: Any) -> None:
        """Hook ``fn`` to a session event (``after_flush``, ``after_commit``, ...) of the write
        sessions (``tx()``)."""
        event.listen(self._sessions, name, fn)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
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

    def dispose(self) -> None:
        self.engine.dispose()
