"""Alembic environment of the vault. Runs on the connection handed over by
:func:`drsite.vault.db.database.upgrade` (or on ``sqlalchemy.url`` when run by the alembic
command line)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from drsite.vault.db.models import Base


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    conn = context.config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url for the vault migrations")
    engine = create_engine(url)
    with engine.begin() as connection:
        _run(connection)


run_migrations()
