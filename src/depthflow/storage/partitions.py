"""Time partitions of the big tables: created ahead and on demand, dropped whole by retention.

``price_ticks``, ``orders``, ``trading_signals`` and ``book_checkpoints`` are range-partitioned on
``event_time`` in spans of ``PARTITION_DAYS`` days (aligned on the Unix epoch, UTC), one child
table per span named ``<table>_p<YYYYMMDD>`` after its first day. There is no default partition:
a row outside every partition is refused, so the writer makes sure its batch's spans exist before
it copies (`ensure_spans`), and maintenance creates the next spans ahead (`create_ahead`).
Retention (`drop_older`) detaches a whole partition CONCURRENTLY (no lock that blocks the
writer's inserts) and then drops it: no DELETE over millions of rows.

The span arithmetic is pure; the functions taking a connection run the DDL.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Final

import asyncpg

__all__ = [
    "PARTITIONED_TABLES",
    "KnownSpans",
    "PartitionError",
    "Span",
    "batch_spans",
    "create_ahead",
    "create_partition_sql",
    "drop_older",
    "ensure_spans",
    "is_partition",
    "list_partitions",
    "span_of",
    "spans_between",
]

log = logging.getLogger(__name__)

PARTITIONED_TABLES: Final = ("price_ticks", "orders", "trading_signals", "book_checkpoints")
_EPOCH: Final = date(1970, 1, 1)
# DDL waits at most this long for its lock, so a long query on a parent never queues the
# writer's inserts behind a CREATE TABLE ... PARTITION OF (the next round tries again).
_LOCK_TIMEOUT: Final = "2s"
MAX_NEW_PER_BATCH: Final = 64
_NAME = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")


class PartitionError(OSError):
    """A partition could not be created (lock timeout, server away): retry later. An OSError so
    the writer retries the batch instead of counting its rows as refused for good."""


Span = tuple[date, date]  # [first day, day after the last)


def span_of(day: date, days: int) -> Span:
    """The span of ``days`` days (aligned on the epoch) holding ``day``."""
    offset = (day - _EPOCH).days // days * days
    start = _EPOCH + timedelta(days=offset)
    return start, start + timedelta(days=days)


def spans_between(first: date, last: date, days: int) -> Iterator[Span]:
    """Every span from the one holding ``first`` to the one holding ``last``."""
    start, end = span_of(first, days)
    while start <= last:
        yield start, end
        start, end = end, end + timedelta(days=days)


def is_partition(name: str) -> bool:
    """Whether ``name`` is a partition this module names (``<table>_p<YYYYMMDD>``)."""
    match = _NAME.match(name)
    return match is not None and match["table"] in PARTITIONED_TABLES


def partition_name(table: str, span: Span) -> str:
    return f"{table}_p{span[0]:%Y%m%d}"


def create_partition_sql(table: str, span: Span) -> str:
    start, end = span
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(table, span)} PARTITION OF {table} "
        f"FOR VALUES FROM ('{start.isoformat()} 00:00:00+00') TO ('{end.isoformat()} 00:00:00+00')"
    )


async def list_partitions(conn: asyncpg.Connection, table: str) -> list[tuple[str, Span]]:
    """The partitions of ``table`` named by this module, with their spans, oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        table,
    )
    found = []
    for row in rows:
        match = _NAME.match(row["relname"])
        bounds = re.findall(r"'(\d{4}-\d{2}-\d{2})", row["bound"])
        if match and len(bounds) == 2:
            found.append(
                (row["relname"], (date.fromisoformat(bounds[0]), date.fromisoformat(bounds[1])))
            )
    return sorted(found, key=lambda item: item[1])


async def ensure_spans(
    conn: asyncpg.Connection, spans: Iterable[Span], tables: Iterable[str] = PARTITIONED_TABLES
) -> int:
    """Create the partitions of ``spans`` that are missing (outside any transaction); the number
    created. Raises `PartitionError` when one cannot be created now."""
    created = 0
    try:
        async with _lock_timeout(conn):
            for table in tables:
                existing = {name for name, _ in await list_partitions(conn, table)}
                for span in spans:
                    name = partition_name(table, span)
                    if name in existing:
                        continue
                    await conn.execute(create_partition_sql(table, span))
                    created += 1
                    log.info(
                        "partition_created", extra={"fields": {"table": table, "partition": name}}
                    )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise PartitionError(f"cannot create partitions now: {exc!r}") from exc
    return created


async def create_ahead(conn: asyncpg.Connection, days: int, *, now: datetime | None = None) -> int:
    """The current span and the next two, for every partitioned table."""
    today = (now or datetime.now(UTC)).date()
    spans = list(spans_between(today, today + timedelta(days=2 * days), days))
    return await ensure_spans(conn, spans)


async def drop_older(
    conn: asyncpg.Connection, retention_days: int, *, now: datetime | None = None
) -> list[str]:
    """Detach (CONCURRENTLY) and drop every partition whose span ended ``retention_days`` or
    more days ago; the names dropped. The current span is never dropped."""
    cutoff = (now or datetime.now(UTC)).date() - timedelta(days=retention_days)
    dropped = []
    async with _lock_timeout(conn):
        for table in PARTITIONED_TABLES:
            for name, (_, end) in await list_partitions(conn, table):
                if end > cutoff:
                    continue
                try:
                    # CONCURRENTLY: no ACCESS EXCLUSIVE on the parent, so inserts go on meanwhile.
                    await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {name} CONCURRENTLY")
                    await conn.execute(f"DROP TABLE {name}")
                except asyncpg.PostgresError as exc:
                    log.warning(
                        "partition_drop_failed",
                        extra={"fields": {"partition": name, "error": repr(exc)}},
                    )
                    await _finalize_detach(conn, table, name)
                    continue
                dropped.append(name)
                fields = {"table": table, "partition": name, "retention_days": retention_days}
                log.info("partition_dropped", extra={"fields": fields})
    return dropped


async def _finalize_detach(conn: asyncpg.Connection, table: str, name: str) -> None:
    # A DETACH ... CONCURRENTLY interrupted half way leaves the partition "detach pending";
    # FINALIZE completes it (and fails harmlessly when nothing is pending).
    try:
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {name} FINALIZE")
    except asyncpg.PostgresError:
        return


@contextlib.asynccontextmanager
async def _lock_timeout(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """The DDL inside waits at most `_LOCK_TIMEOUT` for a lock; the session's setting after."""
    await conn.execute(f"SET lock_timeout = '{_LOCK_TIMEOUT}'")
    try:
        yield
    finally:
        # A connection that is gone takes its setting with it.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("RESET lock_timeout")


def batch_spans(tables: Iterable[tuple[str, Sequence[datetime]]], days: int) -> set[Span]:
    """The spans that the event times of a batch's rows (per partitioned table) fall in."""
    spans: set[Span] = set()
    for _, times in tables:
        if not times:
            continue
        low = min(times).astimezone(UTC).date()
        high = max(times).astimezone(UTC).date()
        if (high - low).days <= 3 * days:
            spans.update(spans_between(low, high, days))
        else:
            # Far apart (a hostile event time): only the spans rows are in, not all between.
            spans.update(span_of(moment.astimezone(UTC).date(), days) for moment in times)
    return spans


class KnownSpans:
    """The spans whose partitions are known to exist, so a batch creates only what it lacks."""

    def __init__(self, days: int) -> None:
        self.days = days
        self._known: set[Span] = set()

    def missing(self, spans: Iterable[Span]) -> list[Span]:
        """Spans not known to exist, oldest first, at most `MAX_NEW_PER_BATCH`: a batch whose
        rows need more (hostile event times) fails and ends as counted data loss."""
        return sorted(s for s in spans if s not in self._known)[:MAX_NEW_PER_BATCH]

    def add(self, spans: Iterable[Span]) -> None:
        self._known.update(spans)

    def forget(self) -> None:
        """After retention dropped partitions (or anything else changed them)."""
        self._known.clear()
