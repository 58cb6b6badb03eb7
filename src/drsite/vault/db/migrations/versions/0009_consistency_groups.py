"""Multi-VM consistency groups: groups.consistent, the barrier's bound and schedule, and the
barriers (group points) table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("consistent", sa.Boolean(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("barrier_timeout_ms", sa.Integer(), nullable=False,
                                      server_default="500"))
        batch_op.add_column(sa.Column("last_barrier_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("last_app_barrier_at", sa.Float(), nullable=True))
    op.create_table(
        "group_barriers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("app_consistent", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("prepare_deadline", sa.Float(), nullable=False),
        sa.Column("hold_deadline", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("point_time", sa.Float(), nullable=True),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"],
                                name=op.f("fk_group_barriers_group_id_groups"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_group_barriers")),
    )
    op.create_index("ix_group_barriers_group_state", "group_barriers", ["group_id", "state"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_group_barriers_group_state", table_name="group_barriers")
    op.drop_table("group_barriers")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_column("last_app_barrier_at")
        batch_op.drop_column("last_barrier_at")
        batch_op.drop_column("barrier_timeout_ms")
        batch_op.drop_column("consistent")
