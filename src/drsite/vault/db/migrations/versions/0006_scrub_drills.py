"""Scrub and drills: policy scrub interval and rate, item scrub state, damaged points, drills
(of recovery plans and of protection groups: a group's drill schedule).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scrub_interval_s", sa.Float(), nullable=True,
                                      server_default="86400"))
        batch_op.add_column(sa.Column("scrub_rate_bps", sa.BigInteger(), nullable=True,
                                      server_default=str(32 << 20)))
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_scrub_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("scrub", sa.JSON(), nullable=True))
    with op.batch_alter_table("points", schema=None) as batch_op:
        batch_op.add_column(sa.Column("damage", sa.JSON(), nullable=True))
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drill", sa.JSON(), nullable=True))
    op.create_table(
        "drills",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=True),
        sa.Column("group", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drills")),
    )
    op.create_index(op.f("ix_drills_plan"), "drills", ["plan"], unique=False)
    op.create_index(op.f("ix_drills_group"), "drills", ["group"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_drills_group"), table_name="drills")
    op.drop_index(op.f("ix_drills_plan"), table_name="drills")
    op.drop_table("drills")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_column("drill")
    with op.batch_alter_table("points", schema=None) as batch_op:
        batch_op.drop_column("damage")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("scrub")
        batch_op.drop_column("last_scrub_at")
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_column("scrub_rate_bps")
        batch_op.drop_column("scrub_interval_s")
