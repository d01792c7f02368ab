"""Alembic migrations against the real PostgreSQL: exact schema of the contract, indexes, drift
between models and migrations, downgrade and upgrade again, database creation with odd names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection, make_url

from depthflow.records import (
    CHECKPOINT_COLUMNS,
    GAP_COLUMNS,
    ORDER_COLUMNS,
    SIGNAL_COLUMNS,
    TICK_COLUMNS,
)
from depthflow.storage import db
from depthflow.storage.models import Base
from depthflow.storage.partitions import is_partition

BIGINT, TEXT, TSTZ, DOUBLE = "bigint", "text", "timestamp with time zone", "double precision"

EXPECTED_COLUMNS = {
    "price_ticks": [
        ("id", BIGINT),
        ("symbol", TEXT),
        ("event_time", TSTZ),
        ("received_at", TSTZ),
        ("first_update_id", BIGINT),
        ("last_update_id", BIGINT),
        ("best_bid", DOUBLE),
        ("best_bid_qty", DOUBLE),
        ("best_ask", DOUBLE),
        ("best_ask_qty", DOUBLE),
        ("wap", DOUBLE),
    ],
    "orders": [
        ("id", BIGINT),
        ("symbol", TEXT),
        ("event_time", TSTZ),
        ("last_update_id", BIGINT),
        ("side", TEXT),
        ("price", DOUBLE),
        ("quantity", DOUBLE),
    ],
    "trading_signals": [
        ("id", BIGINT),
        ("symbol", TEXT),
        ("signal", TEXT),
        ("price", DOUBLE),
        ("sma_short", DOUBLE),
        ("sma_long", DOUBLE),
        ("event_time", TSTZ),
        ("last_update_id", BIGINT),
        ("created_at", TSTZ),
    ],
    "data_gaps": [
        ("id", BIGINT),
        ("symbol", TEXT),
        ("from_update_id", BIGINT),
        ("to_update_id", BIGINT),
        ("from_time", TSTZ),
        ("to_time", TSTZ),
        ("reason", TEXT),
        ("detected_at", TSTZ),
    ],
    "ingest_batches": [("batch_id", "uuid"), ("rows", "integer"), ("written_at", TSTZ)],
    "runs": [
        ("id", BIGINT),
        ("source", TEXT),
        ("file_path", TEXT),
        ("file_sha256", TEXT),
        ("symbols", "ARRAY"),
        ("status", TEXT),
        ("host", TEXT),
        ("pid", "integer"),
        ("started_at", TSTZ),
        ("last_seen_at", TSTZ),
        ("ended_at", TSTZ),
        ("update_ids", "jsonb"),
    ],
    "book_checkpoints": [
        ("id", BIGINT),
        ("symbol", TEXT),
        ("event_time", TSTZ),
        ("last_update_id", BIGINT),
        ("bids", "ARRAY"),  # of double precision, two dimensions (information_schema says ARRAY)
        ("asks", "ARRAY"),
    ],
}
EXPECTED_INDEXES = {
    ("price_ticks", "ix_price_ticks_symbol_event_time", ("symbol", "event_time")),
    ("price_ticks", "ix_price_ticks_symbol_last_update_id", ("symbol", "last_update_id")),
    ("orders", "ix_orders_symbol_event_time", ("symbol", "event_time")),
    ("trading_signals", "ix_trading_signals_symbol_event_time", ("symbol", "event_time")),
    ("price_ticks", "ix_price_ticks_event_time", ("event_time",)),
    ("trading_signals", "ix_trading_signals_event_time", ("event_time",)),
    ("data_gaps", "ix_data_gaps_symbol_to_time", ("symbol", "to_time")),
    ("data_gaps", "ix_data_gaps_symbol_to_update_id", ("symbol", "to_update_id")),
    ("book_checkpoints", "ix_book_checkpoints_symbol_event_time", ("symbol", "event_time")),
    (
        "book_checkpoints",
        "ix_book_checkpoints_symbol_last_update_id",
        ("symbol", "last_update_id"),
    ),
}


@pytest.fixture
async def scratch_url(database_url: str) -> AsyncIterator[str]:
    """A database of this test's own (upper case and a hyphen: only valid when quoted)."""
    url = make_url(database_url).set(database=f"Depthflow-Mig-{uuid.uuid4().hex[:8]}")
    rendered = url.render_as_string(hide_password=False)
    yield rendered
    await db.drop_database(rendered)


async def _query(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def _columns(url: str) -> dict[str, list[tuple[str, str]]]:
    rows = await _query(
        url,
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    columns: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        if is_partition(row["table_name"]):
            continue
        columns.setdefault(row["table_name"], []).append((row["column_name"], row["data_type"]))
    return columns


async def _indexes(url: str) -> set[tuple[str, str, tuple[str, ...]]]:
    rows = await _query(
        url,
        "SELECT t.relname AS table_name, i.relname AS index_name, "
        "array_agg(a.attname ORDER BY k.ord) AS columns "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_class t ON t.oid = x.indrelid "
        "JOIN unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord) ON true "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
        "JOIN pg_namespace n ON n.oid = t.relnamespace "
        "WHERE n.nspname = 'public' AND NOT x.indisprimary "
        "GROUP BY t.relname, i.relname",
    )
    return {
        (r["table_name"], r["index_name"], tuple(r["columns"]))
        for r in rows
        if not is_partition(r["table_name"])
    }


def _diff(connection: Connection) -> list[object]:
    def parents_only(name: str | None, type_: str, parent_names: object) -> bool:
        return not (type_ == "table" and name is not None and is_partition(name))

    context = MigrationContext.configure(connection, opts={"include_name": parents_only})
    return list(compare_metadata(context, Base.metadata))


async def test_migrate_creates_the_database_and_the_contract_schema(scratch_url: str) -> None:
    await db.migrate(scratch_url)

    columns = await _columns(scratch_url)
    assert {t: c for t, c in columns.items() if t != "alembic_version"} == EXPECTED_COLUMNS
    assert await _indexes(scratch_url) >= EXPECTED_INDEXES
    identity = await _query(
        scratch_url,
        "SELECT table_name FROM information_schema.columns "
        "WHERE column_name = 'id' AND is_identity = 'YES' ORDER BY table_name",
    )
    assert [r["table_name"] for r in identity if not is_partition(r["table_name"])] == [
        "book_checkpoints",
        "data_gaps",
        "orders",
        "price_ticks",
        "runs",
        "trading_signals",
    ]


def test_row_shapes_follow_the_table_column_order() -> None:
    assert tuple(c for c, _ in EXPECTED_COLUMNS["price_ticks"][1:]) == TICK_COLUMNS
    assert tuple(c for c, _ in EXPECTED_COLUMNS["orders"][1:]) == ORDER_COLUMNS
    assert tuple(c for c, _ in EXPECTED_COLUMNS["trading_signals"][1:-1]) == SIGNAL_COLUMNS
    assert tuple(c for c, _ in EXPECTED_COLUMNS["data_gaps"][1:-1]) == GAP_COLUMNS
    assert tuple(c for c, _ in EXPECTED_COLUMNS["book_checkpoints"][1:]) == CHECKPOINT_COLUMNS


async def test_models_and_migrations_do_not_drift(scratch_url: str) -> None:
    await db.migrate(scratch_url)
    engine = db.make_engine(scratch_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_upgrade_again(scratch_url: str) -> None:
    await db.migrate(scratch_url)

    await asyncio.to_thread(db.downgrade, scratch_url, "base")
    assert set(await _columns(scratch_url)) == {"alembic_version"}

    await db.migrate(scratch_url)  # the database exists now: only the upgrade runs
    assert {t for t in await _columns(scratch_url) if t != "alembic_version"} == set(
        EXPECTED_COLUMNS
    )
    version = await _query(scratch_url, "SELECT version_num FROM alembic_version")
    assert [r["version_num"] for r in version] == [db.head_revision()]


async def test_ensure_database_creates_once_and_drop_removes(scratch_url: str) -> None:
    name = make_url(scratch_url).database
    assert await db.ensure_database(scratch_url) is True
    assert await db.ensure_database(scratch_url) is False

    await db.drop_database(scratch_url)

    server = make_url(scratch_url).set(database="postgres").render_as_string(hide_password=False)
    found = await _query(server, f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
    assert found == []


def test_alembic_config_keeps_percent_signs_of_the_url() -> None:
    url = "postgresql+asyncpg://user:p%40ss%25@db.example:5432/depthflow"
    assert db.alembic_config(url).get_main_option("sqlalchemy.url") == url


def test_asyncpg_dsn_drops_the_driver_name() -> None:
    dsn = db.asyncpg_dsn("postgresql+asyncpg://user:p%40ss@localhost:5433/x")
    assert dsn == "postgresql://user:p%40ss@localhost:5433/x"
