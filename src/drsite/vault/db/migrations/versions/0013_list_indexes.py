"""Indexes for the reads that run per request and per health pass at scale (issue 13):
``ix_items_vm_name_id`` serves ``GET /items``'s order (VM name, then id), so a page can be read
in index order up to its limit instead of sorting every matching row with its report (a
planner with statistics takes it; SQLite 3.40 without ``ANALYZE`` still prefers the status
index and sorts: 2.9 ms for 1,000 items); and
``ix_points_damaged``, a partial index on the few damaged points, serves ``scrub.damage_of``
(each health pass, each page of items) without scanning the whole point catalogue (144 points
per item with a 30 s policy and 24 h retention).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

DAMAGED = sa.text("damage IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_items_vm_name_id", "items", ["vm_name", "id"], unique=False)
    op.create_index("ix_points_damaged", "points", ["item_id"], unique=False,
                    sqlite_where=DAMAGED, postgresql_where=DAMAGED)


def downgrade() -> None:
    op.drop_index("ix_points_damaged", table_name="points")
    op.drop_index("ix_items_vm_name_id", table_name="items")
