"""Migrations run on an empty database (SQLite and PostgreSQL), are idempotent, and produce
exactly the schema of the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from drsite.vault.db.database import Database, sqlite_url
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
