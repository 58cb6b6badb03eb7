"""Trust boundaries (issue 11): re-issue keys bound to one host.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("registration_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_id", sa.String(length=64), nullable=True))
        batch_op.create_foreign_key(op.f("fk_registration_keys_host_id_hosts"), "hosts",
                                    ["host_id"], ["id"], ondelete="CASCADE")


def downgrade() -> None:
    with op.batch_alter_table("registration_keys", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_registration_keys_host_id_hosts"), type_="foreignkey")
        batch_op.drop_column("host_id")
