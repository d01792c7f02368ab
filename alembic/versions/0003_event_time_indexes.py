"""Indexes on event_time alone, for the newest ticks and signals of every symbol.

``GET /ticks`` and ``GET /signals`` without ``symbol=`` order by ``event_time DESC, id DESC``; these
let them read the last rows of the index instead of sorting the whole table. Built CONCURRENTLY
(outside the migration's transaction) so a live writer is not blocked while a large table is
indexed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_price_ticks_event_time", "price_ticks"),
    ("ix_trading_signals_event_time", "trading_signals"),
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table in INDEXES:
            op.create_index(name, table, ["event_time"], postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
