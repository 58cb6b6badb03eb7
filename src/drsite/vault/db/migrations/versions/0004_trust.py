"""Trust boundaries (issue 11): re-issue keys bound to one host; the audit trail.

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
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("actor_kind", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=128), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
    )
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_actor"), ["actor"], unique=False)
    with op.batch_alter_table("registration_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_id", sa.String(length=64), nullable=True))
        batch_op.create_foreign_key(op.f("fk_registration_keys_host_id_hosts"), "hosts",
                                    ["host_id"], ["id"], ondelete="CASCADE")


def downgrade() -> None:
    with op.batch_alter_table("registration_keys", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_registration_keys_host_id_hosts"), type_="foreignkey")
        batch_op.drop_column("host_id")
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_actor"))
        batch_op.drop_index(batch_op.f("ix_audit_at"))
    op.drop_table("audit")
