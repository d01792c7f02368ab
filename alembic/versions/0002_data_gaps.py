"""data_gaps: one row for every hole in a symbol's stored sequence of update ids.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "data_gaps",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("from_update_id", sa.BigInteger(), nullable=False),
        sa.Column("to_update_id", sa.BigInteger(), nullable=False),
        sa.Column("from_time", TIMESTAMPTZ, nullable=True),
        sa.Column("to_time", TIMESTAMPTZ, nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detected_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_data_gaps_symbol_to_time", "data_gaps", ["symbol", "to_time"])
    op.create_index("ix_data_gaps_symbol_to_update_id", "data_gaps", ["symbol", "to_update_id"])


def downgrade() -> None:
    op.drop_index("ix_data_gaps_symbol_to_update_id", table_name="data_gaps")
    op.drop_index("ix_data_gaps_symbol_to_time", table_name="data_gaps")
    op.drop_table("data_gaps")
