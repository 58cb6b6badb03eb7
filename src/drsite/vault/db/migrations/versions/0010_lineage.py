"""A VM's one identity across failover and failback: ``items.lineage_id`` (the id of the first
item that protected the VM; reverse items of re-protect inherit it), and ``groups.reverse_of_id``
(the group a re-protect's reverse group mirrors, so a failback's items go home to the original
group instead of a ``-reverse-reverse`` one).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lineage_id", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_items_lineage_id"), ["lineage_id"], unique=False)
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reverse_of_id", sa.Integer(), nullable=True))
    # existing items: follow origin_item_id back to the first item of the chain
    conn = op.get_bind()
    items = sa.table("items", sa.column("id", sa.String), sa.column("origin_item_id", sa.String),
                     sa.column("lineage_id", sa.String))
    origin = dict(conn.execute(sa.select(items.c.id, items.c.origin_item_id)).all())
    for item_id in origin:
        root, seen = item_id, {item_id}
        while origin.get(root) and origin[root] in origin and origin[root] not in seen:
            root = origin[root]
            seen.add(root)
        conn.execute(items.update().where(items.c.id == item_id).values(lineage_id=root))


def downgrade() -> None:
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_column("reverse_of_id")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_items_lineage_id"))
        batch_op.drop_column("lineage_id")
