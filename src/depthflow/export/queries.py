"""What `depthflow export` reads: the tables, their columns and kinds, and the SQL that selects
and counts their rows. Pure: no connection here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from depthflow.export.files import Column

__all__ = [
    "BOOK_COLUMNS",
    "SOURCES",
    "Filters",
    "Query",
    "Source",
    "count_query",
    "select_query",
]

# ISO-8601 UTC with microseconds, as the API writes times: 2024-08-08T23:59:30.123000Z.
_PG_ISO = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


@dataclass(frozen=True, slots=True)
class Source:
    """A table as exported: its columns in order, and the time column --start/--end filter."""

    table: str
    time_column: str
    columns: tuple[Column, ...]


def _columns(spec: str) -> tuple[Column, ...]:
    """``"id:int symbol:text ..."`` -> columns."""
    pairs = (item.split(":") for item in spec.split())
    return tuple(Column(name, kind) for name, kind in pairs)  # type: ignore[arg-type]


SOURCES: dict[str, Source] = {
    "ticks": Source(
        "price_ticks",
        "event_time",
        _columns(
            "id:int symbol:text event_time:time received_at:time first_update_id:int "
            "last_update_id:int best_bid:float best_bid_qty:float best_ask:float "
            "best_ask_qty:float wap:float"
        ),
    ),
    "orders": Source(
        "orders",
        "event_time",
        _columns(
            "id:int symbol:text event_time:time last_update_id:int side:text price:float "
            "quantity:float"
        ),
    ),
    "signals": Source(
        "trading_signals",
        "event_time",
        _columns(
            "id:int symbol:text signal:text price:float sma_short:float sma_long:float "
            "event_time:time last_update_id:int created_at:time"
        ),
    ),
    # A gap is placed in time by the stored event after it (its to_time), as GET /gaps does.
    "gaps": Source(
        "data_gaps",
        "to_time",
        _columns(
            "id:int symbol:text from_update_id:int to_update_id:int from_time:time "
            "to_time:time reason:text detected_at:time"
        ),
    ),
}
# One row per level of a rebuilt book: `at` is the instant asked for (for an update id, the
# book's event time); `level` 1 is the best; bids, then asks.
BOOK_COLUMNS = _columns(
    "at:time symbol:text last_update_id:int event_time:time side:text level:int price:float "
    "quantity:float"
)


@dataclass(frozen=True, slots=True)
class Filters:
    symbol: str | None = None  # upper case, as stored
    start: datetime | None = None  # inclusive
    end: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    args: tuple[object, ...]


def _where(source: Source, filters: Filters) -> Query:
    conditions: list[str] = []
    args: list[object] = []
    for condition, value in (
        ("symbol = ", filters.symbol),
        (f"{source.time_column} >= ", filters.start),
        (f"{source.time_column} < ", filters.end),
    ):
        if value is not None:
            args.append(value)
            conditions.append(f"{condition}${len(args)}")
    return Query(" WHERE " + " AND ".join(conditions) if conditions else "", tuple(args))


def select_query(source: Source, filters: Filters, *, text_times: bool = False) -> Query:
    """The rows of ``source`` matching ``filters``, ordered by (symbol, time, id) so that the
    file is the same every time; ``text_times``: times as ISO-8601 UTC text (for CSV)."""
    names = [
        f"to_char({c.name} AT TIME ZONE 'UTC', '{_PG_ISO}') AS {c.name}"
        if text_times and c.kind == "time"
        else c.name
        for c in source.columns
    ]
    where = _where(source, filters)
    sql = (
        f"SELECT {', '.join(names)} FROM {source.table}{where.sql} "
        f"ORDER BY symbol, {source.time_column}, id"
    )
    return Query(sql, where.args)


def count_query(source: Source, filters: Filters) -> Query:
    where = _where(source, filters)
    return Query(f"SELECT count(*) FROM {source.table}{where.sql}", where.args)
