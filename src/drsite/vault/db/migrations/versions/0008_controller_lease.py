"""The controller lease: one vault process of several on a database runs the background work;
when a store host's lists were built and confirmed, and when an item's store grant last changed
its writer (``storeacl.grant_pending`` at scale).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    lease = op.create_table(
        "controller_lease",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=True),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=True),
        sa.Column("renewed_at", sa.Float(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_controller_lease")),
    )
    # the row exists from the start: every acquisition is an UPDATE of a locked row
    op.bulk_insert(lease, [{"name": "controller", "epoch": 0, "holder": None, "info": {},
                            "acquired_at": None, "renewed_at": None, "expires_at": 0.0}])
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("store_acl_sent_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("store_acl_confirmed_at", sa.Float(), nullable=True))
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("grant_changed_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("grant_changed_at")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("store_acl_confirmed_at")
        batch_op.drop_column("store_acl_sent_at")
    op.drop_table("controller_lease")
