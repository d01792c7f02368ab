"""Initial schema: price_ticks, orders, trading_signals and the writer's ingest_batches.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "price_ticks",
        _id(),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("event_time", TIMESTAMPTZ, nullable=False),
        sa.Column("received_at", TIMESTAMPTZ, nullable=False),
        sa.Column("first_update_id", sa.BigInteger(), nullable=False),
        sa.Column("last_update_id", sa.BigInteger(), nullable=False),
        sa.Column("best_bid", sa.Double(), nullable=False),
        sa.Column("best_bid_qty", sa.Double(), nullable=False),
        sa.Column("best_ask", sa.Double(), nullable=False),
        sa.Column("best_ask_qty", sa.Double(), nullable=False),
        sa.Column("wap", sa.Double(), nullable=False),
    )
    op.create_index("ix_price_ticks_symbol_event_time", "price_ticks", ["symbol", "event_time"])
    op.create_index(
        "ix_price_ticks_symbol_last_update_id", "price_ticks", ["symbol", "last_update_id"]
    )

    op.create_table(
        "orders",
        _id(),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("event_time", TIMESTAMPTZ, nullable=False),
        sa.Column("last_update_id", sa.BigInteger(), nullable=False),
        sa.Column("side", sa.Text(), nullable=False),
        sa.Column("price", sa.Double(), nullable=False),
        sa.Column("quantity", sa.Double(), nullable=False),
    )
    op.create_index("ix_orders_symbol_event_time", "orders", ["symbol", "event_time"])

    op.create_table(
        "trading_signals",
        _id(),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("signal", sa.Text(), nullable=False),
        sa.Column("price", sa.Double(), nullable=False),
        sa.Column("sma_short", sa.Double(), nullable=False),
        sa.Column("sma_long", sa.Double(), nullable=False),
        sa.Column("event_time", TIMESTAMPTZ, nullable=False),
        sa.Column("last_update_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False),
    )
    op.create_index(
        "ix_trading_signals_symbol_event_time", "trading_signals", ["symbol", "event_time"]
    )

    op.create_table(
        "ingest_batches",
        sa.Column("batch_id", sa.Uuid(), primary_key=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("written_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingest_batches")
    op.drop_index("ix_trading_signals_symbol_event_time", table_name="trading_signals")
    op.drop_table("trading_signals")
    op.drop_index("ix_orders_symbol_event_time", table_name="orders")
    op.drop_table("orders")
    op.drop_index("ix_price_ticks_symbol_last_update_id", table_name="price_ticks")
    op.drop_index("ix_price_ticks_symbol_event_time", table_name="price_ticks")
    op.drop_table("price_ticks")
