"""Shared pytest plugins: ``tests.pg`` provides the ``pg_server`` / ``pg_url`` fixtures (a
throw-away PostgreSQL cluster; see tests/pg.py)."""

pytest_plugins = ["tests.pg"]
