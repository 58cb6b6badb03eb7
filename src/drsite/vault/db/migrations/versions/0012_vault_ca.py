"""The vault's CA in its database (issue 14): the certificate, and its private key sealed under
the master key, so a standby vault at another site — its database a streaming replica of this
one — serves the agents with the same CA.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_ca",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("cert", sa.Text(), nullable=False),
        sa.Column("key", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_vault_ca")),
    )


def downgrade() -> None:
    op.drop_table("vault_ca")
