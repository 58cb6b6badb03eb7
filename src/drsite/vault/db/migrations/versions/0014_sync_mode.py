"""Synchronous mode per policy (issue 18): ``policies.mode`` ("async" | "sync") and
``policies.sync_budget_ms`` (the most a guest write waits for the recovery site).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=8), nullable=False,
                                      server_default="async"))
        batch_op.add_column(sa.Column("sync_budget_ms", sa.Integer(), nullable=False,
                                      server_default="50"))


def downgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_column("sync_budget_ms")
        batch_op.drop_column("mode")
