"""Migrations run on an empty database (SQLite and PostgreSQL), are idempotent, and produce
exactly the schema of the models; an older database upgrades with its rows, and downgrades."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from drsite.vault.db.database import Database, alembic_config, sqlite_url
from drsite.vault.db.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return sqlite_url(tmp_path / "vault.db")


def test_upgrade_head_on_an_empty_database(url: str) -> None:
    db = Database(url)
    try:
        assert inspect(db.engine).get_table_names() == []
        db.migrate()
        db.migrate()  # a second start finds the schema current
        tables = set(inspect(db.engine).get_table_names())
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
        with db.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                     Base.metadata)
        assert diffs == []
    finally:
        db.dispose()


def _schema_diffs(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                     Base.metadata))


def _columns(db: Database, table: str) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns(table)}


@pytest.mark.parametrize("start", ["0006", "0007", "0008", "0009"])
def test_upgrade_from_an_older_revision_keeps_the_rows_and_downgrades_cleanly(
        url: str, start: str) -> None:
    """A database at 0006 (before the store's sent list), 0007 (before the controller lease),
    0008 (before consistency groups) or 0009 (before the items' lineage) reaches the models'
    schema with its hosts intact; a downgrade to ``start`` undoes what came after it and a
    second upgrade gets there again."""
    db = Database(url)
    try:
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(conn), start)
            conn.execute(text("INSERT INTO sites (name, description, created_at) "
                              "VALUES ('a', '', 1.0)"))
            conn.execute(text("INSERT INTO hosts (id, name, site_id, cert_fingerprint, "
                              "cert_serial, registered_at, version) "
                              "SELECT 'h-1', 'host1', id, 'fp', '1', 2.0, '' FROM sites"))
        db.migrate()
        assert _schema_diffs(db) == []
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name, registered_at FROM hosts")).all() \
                == [("host1", 2.0)]
            assert conn.execute(text("SELECT epoch, holder FROM controller_lease")).all() \
                == [(0, None)]
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), start)
        assert "lineage_id" not in _columns(db, "items")
        assert "reverse_of_id" not in _columns(db, "groups")
        leased = start in ("0008", "0009")
        assert ("consistent" in _columns(db, "groups")) == (start == "0009")
        assert ("group_barriers" in inspect(db.engine).get_table_names()) == (start == "0009")
        assert ("controller_lease" in inspect(db.engine).get_table_names()) == leased
        assert ("grant_changed_at" in _columns(db, "items")) == leased
        hosts = _columns(db, "hosts")
        assert bool(hosts & {"store_acl_sent_at", "store_acl_confirmed_at"}) == leased
        assert ("store_acl_sent" in hosts) == (start != "0006")
        db.migrate()
        assert _schema_diffs(db) == []
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM hosts")).all() == [("host1",)]
    finally:
        db.dispose()
