"""Authentic points and store access lists (issue 11): one point key per item, sealed at rest;
the digest of the access list each store-serving agent holds.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "point_keys",
        sa.Column("item_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_point_keys")),
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("store_acl_digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("store_acl_digest")
    op.drop_table("point_keys")
