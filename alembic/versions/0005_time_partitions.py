"""Range-partition price_ticks, orders, trading_signals and book_checkpoints on event_time.

Each table is rebuilt as a partitioned table with every row kept (ids included): the old table is
renamed, a partitioned one with the same columns takes its name, partitions are created for the
days the old rows cover (and the next days), the rows are copied over, the identity continues
after the highest id, and the old table is dropped. The key becomes ``(id, event_time)``:
PostgreSQL requires a partitioned table's unique keys to hold the partition key.

On a large database this copies everything once, inside the migration's transaction: plan a
maintenance window (the writer's buffer rides out a short one).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from depthflow.storage.partitions import create_partition_sql, spans_between

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each table's secondary indexes: (name, columns).
INDEXES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "price_ticks": (
        ("ix_price_ticks_symbol_event_time", ("symbol", "event_time")),
        ("ix_price_ticks_symbol_last_update_id", ("symbol", "last_update_id")),
        ("ix_price_ticks_event_time", ("event_time",)),
    ),
    "orders": (("ix_orders_symbol_event_time", ("symbol", "event_time")),),
    "trading_signals": (
        ("ix_trading_signals_symbol_event_time", ("symbol", "event_time")),
        ("ix_trading_signals_event_time", ("event_time",)),
    ),
    "book_checkpoints": (
        ("ix_book_checkpoints_symbol_event_time", ("symbol", "event_time")),
        ("ix_book_checkpoints_symbol_last_update_id", ("symbol", "last_update_id")),
    ),
}


def _partition_days() -> int:
    # `depthflow migrate` passes PARTITION_DAYS; a plain `alembic upgrade` gets daily spans.
    return int(op.get_context().config.attributes.get("partition_days", 1))


def _set_aside(table: str, suffix: str) -> str:
    """Rename ``table`` (its key, identity sequence and indexes too) out of the way."""
    old = f"{table}_{suffix}"
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    op.execute(f"ALTER INDEX {table}_pkey RENAME TO {old}_pkey")
    op.execute(f"ALTER SEQUENCE IF EXISTS {table}_id_seq RENAME TO {old}_id_seq")
    for name, _ in INDEXES[table]:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    return old


def _move_rows(old: str, table: str) -> None:
    op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
    # The identity goes on after the highest id copied (is_called=false: the next one is max+1).
    op.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
        f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
    )
    op.execute(f"DROP TABLE {old}")
    for name, columns in INDEXES[table]:
        op.create_index(name, table, list(columns))


def upgrade() -> None:
    days = _partition_days()
    bind = op.get_bind()
    today = datetime.now(UTC).date()
    for table in INDEXES:
        old = _set_aside(table, "unpartitioned")
        op.execute(
            f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY) "
            "PARTITION BY RANGE (event_time)"
        )
        op.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id, event_time)")
        first, last = bind.execute(
            sa.text(f"SELECT min(event_time), max(event_time) FROM {old}")
        ).one()
        spans = list(spans_between(today, today + timedelta(days=2 * days), days))
        if first is not None:
            spans += spans_between(first.astimezone(UTC).date(), last.astimezone(UTC).date(), days)
        for span in sorted(set(spans)):
            op.execute(create_partition_sql(table, span))
        _move_rows(old, table)


def downgrade() -> None:
    for table in INDEXES:
        old = _set_aside(table, "partitioned")
        op.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY)")
        op.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
        # DROP TABLE of the partitioned one drops its partitions with it.
        _move_rows(old, table)
