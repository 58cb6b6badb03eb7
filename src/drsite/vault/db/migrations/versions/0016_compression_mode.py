"""Adaptive compression (issue 16): ``policies.compression`` becomes a mode, "auto" | "zstd" |
"off", instead of a boolean. Existing rows keep their meaning: true → "zstd", false → "off".
A downgrade maps "off" to false and "zstd" and "auto" to true.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("compression_mode", sa.String(length=8), nullable=True))
    op.execute("UPDATE policies SET compression_mode = "
               "CASE WHEN compression THEN 'zstd' ELSE 'off' END")
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_column("compression")
        batch_op.alter_column("compression_mode", new_column_name="compression",
                              existing_type=sa.String(length=8), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("compression_bool", sa.Boolean(), nullable=True))
    op.execute("UPDATE policies SET compression_bool = "
               "CASE WHEN compression = 'off' THEN false ELSE true END")
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_column("compression")
        batch_op.alter_column("compression_bool", new_column_name="compression",
                              existing_type=sa.Boolean(), nullable=False)
