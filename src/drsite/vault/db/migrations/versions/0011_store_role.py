"""The store role of a site (``sites.store_host_id``): serving a site's store is granted by an
admin (``drsite sites set-store``), no longer claimed by a host's heartbeat. An upgraded
deployment keeps working: the host that served each site's store until now (a ``store_url``,
not revoked, the most recently heard of its site) gets the role.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sites", sa.Column("store_host_id", sa.String(length=64), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT id, site_id FROM hosts WHERE store_url IS NOT NULL AND revoked_at IS NULL "
        "ORDER BY site_id, last_heartbeat IS NULL, last_heartbeat DESC, id")).all()
    chosen: dict[int, str] = {}
    for host_id, site_id in rows:
        chosen.setdefault(int(site_id), str(host_id))  # the first: most recently heard
    for site_id, host_id in sorted(chosen.items()):
        conn.execute(sa.text("UPDATE sites SET store_host_id = :h WHERE id = :s"),
                     {"h": host_id, "s": site_id})


def downgrade() -> None:
    # a plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy would drop ``sites``,
    # which the hosts' foreign keys refuse
    op.drop_column("sites", "store_host_id")
