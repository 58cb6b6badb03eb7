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


@pytest.mark.parametrize("start", ["0006", "0007", "0008", "0009", "0010", "0011"])
def test_upgrade_from_an_older_revision_keeps_the_rows_and_downgrades_cleanly(
        url: str, start: str) -> None:
    """A database at 0006 (before the store's sent list), 0007 (before the controller lease),
    0008 (before consistency groups), 0009 (before the items' lineage), 0010 (before the
    store role) or 0011 (before the vault's CA in the database) reaches the models' schema with
    its hosts intact; a downgrade to ``start`` undoes what came after it and a second upgrade
    gets there again."""
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
        assert "vault_ca" not in inspect(db.engine).get_table_names()
        assert ("store_host_id" in _columns(db, "sites")) == (start == "0011")
        assert ("lineage_id" in _columns(db, "items")) == (start in ("0010", "0011"))
        assert ("reverse_of_id" in _columns(db, "groups")) == (start in ("0010", "0011"))
        leased = start in ("0008", "0009", "0010", "0011")
        assert ("consistent" in _columns(db, "groups")) == (start in ("0009", "0010", "0011"))
        assert ("group_barriers" in inspect(db.engine).get_table_names()) \
            == (start in ("0009", "0010", "0011"))
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


def test_upgrade_gives_the_store_role_to_the_host_that_served_each_sites_store(url: str) -> None:
    """0011 (store role): serving a store becomes a role; an upgraded deployment keeps working —
    the host that served each site's store (store URL, not revoked, most recently heard) gets
    it; a site with no such host gets none; a downgrade drops the role."""
    db = Database(url)
    try:
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0010")
            for n, site in enumerate(("a", "b", "c"), 1):
                conn.execute(text("INSERT INTO sites (id, name, description, created_at) "
                                  f"VALUES ({n}, '{site}', '', 1.0)"))
            for hid, site, url_, beat, revoked in [
                    ("h-1", 1, "'https://s1'", "10.0", "NULL"),
                    ("h-2", 1, "'https://s2'", "20.0", "NULL"),   # the most recently heard
                    ("h-3", 1, "'https://s3'", "30.0", "5.0"),    # revoked
                    ("h-4", 2, "NULL", "40.0", "NULL"),           # serves no store
                    ("h-5", 3, "'https://s5'", "NULL", "NULL"),   # never heard, but the only one
                    ("h-6", 3, "NULL", "50.0", "NULL")]:
                conn.execute(text(
                    "INSERT INTO hosts (id, name, site_id, cert_fingerprint, cert_serial, "
                    "registered_at, version, store_url, last_heartbeat, revoked_at) VALUES "
                    f"('{hid}', '{hid}', {site}, 'fp', '1', 2.0, '', {url_}, {beat}, {revoked})"))
        db.migrate()
        assert _schema_diffs(db) == []
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name, store_host_id FROM sites ORDER BY name")).all() \
                == [("a", "h-2"), ("b", None), ("c", "h-5")]
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0010")
        assert "store_host_id" not in _columns(db, "sites")
    finally:
        db.dispose()


def test_compression_becomes_a_mode_and_rows_keep_their_meaning(url: str) -> None:
    """0016: ``policies.compression`` goes from a boolean to "auto" | "zstd" | "off": true
    becomes "zstd", false "off"; a downgrade maps "off" to false and the others to true."""
    db = Database(url)
    try:
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0015")
            for n, (nm, comp) in enumerate((("on", "true"), ("no", "false")), 1):
                conn.execute(text(
                    "INSERT INTO policies (id, name, frequency_s, retention_hours, compression, "
                    "encryption, resync_window, rpo_threshold_s, created_at, updated_at) VALUES "
                    f"({n}, '{nm}', 30, 24, {comp}, false, 'always', 60, 1.0, 1.0)"))
        db.migrate()
        assert _schema_diffs(db) == []
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT name, compression FROM policies ORDER BY id")).all() \
                == [("on", "zstd"), ("no", "off")]
            conn.execute(text("INSERT INTO policies (id, name, frequency_s, retention_hours, "
                              "compression, encryption, resync_window, rpo_threshold_s, "
                              "created_at, updated_at) VALUES "
                              "(3, 'ad', 30, 24, 'auto', false, 'always', 60, 1.0, 1.0)"))
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0015")
        with db.engine.connect() as conn:
            got = conn.execute(text("SELECT name, compression FROM policies ORDER BY id")).all()
        assert [(nm, bool(c)) for nm, c in got] == [("on", True), ("no", False), ("ad", True)]
    finally:
        db.dispose()
