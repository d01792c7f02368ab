"""book_checkpoints: the whole local book of a symbol at an update id.

Written when a book goes live and every ``CHECKPOINT_INTERVAL_S``; with the ``orders`` rows after
it, it rebuilds the book at any past instant (``GET /book/{symbol}?at=``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    levels = postgresql.ARRAY(sa.Double(), dimensions=2)
    op.create_table(
        "book_checkpoints",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_update_id", sa.BigInteger(), nullable=False),
        sa.Column("bids", levels, nullable=False),
        sa.Column("asks", levels, nullable=False),
    )
    op.create_index(
        "ix_book_checkpoints_symbol_event_time", "book_checkpoints", ["symbol", "event_time"]
    )
    op.create_index(
        "ix_book_checkpoints_symbol_last_update_id",
        "book_checkpoints",
        ["symbol", "last_update_id"],
    )


def downgrade() -> None:
    op.drop_table("book_checkpoints")
