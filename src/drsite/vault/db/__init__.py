"""The vault's state database: SQLAlchemy 2 models, sessions, Alembic migrations."""
