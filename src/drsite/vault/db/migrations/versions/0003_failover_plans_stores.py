"""Failover records, recovery plans, network mappings, cloud recovery stores.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stores",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("secret", sa.JSON(), nullable=False),
        sa.Column("keys", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stores")),
        sa.UniqueConstraint("name", name=op.f("uq_stores_name")),
    )
    op.create_table(
        "network_mappings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("source_site_id", sa.Integer(), nullable=False),
        sa.Column("recovery_site_id", sa.Integer(), nullable=False),
        sa.Column("source_network", sa.String(length=64), nullable=False),
        sa.Column("recovery_network", sa.String(length=64), nullable=False),
        sa.Column("test_network", sa.String(length=64), nullable=True),
        sa.Column("ip_rule", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["source_site_id"], ["sites.id"],
                                name=op.f("fk_network_mappings_source_site_id_sites")),
        sa.ForeignKeyConstraint(["recovery_site_id"], ["sites.id"],
                                name=op.f("fk_network_mappings_recovery_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_network_mappings")),
        sa.UniqueConstraint("source_site_id", "recovery_site_id", "source_network",
                            name=op.f("uq_network_mappings_source_site_id")),
    )
    op.create_table(
        "failovers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("item_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("point_id", sa.String(length=128), nullable=True),
        sa.Column("point_created_at", sa.Float(), nullable=True),
        sa.Column("recovery_host_id", sa.String(length=64), nullable=True),
        sa.Column("vm_name", sa.String(length=64), nullable=True),
        sa.Column("vm_id", sa.String(length=128), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=True),
        sa.Column("rto_s", sa.Float(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failovers")),
    )
    op.create_index(op.f("ix_failovers_item_id"), "failovers", ["item_id"], unique=False)
    op.create_index(op.f("ix_failovers_state"), "failovers", ["state"], unique=False)
    op.create_table(
        "recovery_plans",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recovery_plans")),
        sa.UniqueConstraint("name", name=op.f("uq_recovery_plans_name")),
    )
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("store_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_groups_store_id_stores"), "stores", ["store_id"], ["id"])
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin_item_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("failover_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("vm_spec", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("vm_spec")
        batch_op.drop_column("failover_id")
        batch_op.drop_column("origin_item_id")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_groups_store_id_stores"), type_="foreignkey")
        batch_op.drop_column("store_id")
    op.drop_table("recovery_plans")
    op.drop_index(op.f("ix_failovers_state"), table_name="failovers")
    op.drop_index(op.f("ix_failovers_item_id"), table_name="failovers")
    op.drop_table("failovers")
    op.drop_table("network_mappings")
    op.drop_table("stores")
