"""When each agent's process last started (``hosts.started_at``): the vault's time of the
first heartbeat that said ``restarted``. A failure to reach a store's agent is retried at once
after each restart of that agent (``vault/retries.py``), not on the seed's schedule.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("started_at")
