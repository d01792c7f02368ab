"""`depthflow export book`: the stored book of a symbol, every level of both sides, at one past
instant (``--at``) or at each of a series (``--start``/``--end``/``--every``), rebuilt by
`depthflow.storage.book_at.book_at` exactly as ``GET /book/{symbol}?at=`` rebuilds it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from depthflow.book_history import PastBook
from depthflow.errors import UserError
from depthflow.export.files import RowSink, iso_utc
from depthflow.export.request import ExportRequest
from depthflow.progress import Progress
from depthflow.storage import db
from depthflow.storage.book_at import Hole, NoCheckpoint, book_at

__all__ = ["book_instants", "book_rows", "export_book", "unknowable"]

BookRow = tuple[datetime, str, int, datetime, str, int, float, float]


def book_instants(start: datetime, end: datetime, every_s: float) -> Iterator[datetime]:
    """``start``, ``start + every_s``, ... before ``end``."""
    step = timedelta(seconds=every_s)
    moment = start
    while moment < end:
        yield moment
        moment += step


def book_rows(at: datetime, book: PastBook, depth: int | None = None) -> list[BookRow]:
    """Rows of `depthflow.export.queries.BOOK_COLUMNS`: bids best first, then asks best
    first; at most ``depth`` levels a side (None: all)."""
    bids, asks = book.top(depth if depth is not None else max(len(book.bids), len(book.asks)))
    head = (at, book.symbol, book.last_update_id, book.event_time)
    return [
        (*head, side, level, price, qty)
        for side, levels in (("bid", bids), ("ask", asks))
        for level, (price, qty) in enumerate(levels, start=1)
    ]


def unknowable(past: Hole | NoCheckpoint, at: object) -> UserError:
    """What to say when the book of ``past.symbol`` at ``at`` cannot be rebuilt."""
    if isinstance(past, NoCheckpoint):
        return UserError(f"no stored book of {past.symbol} at or before {at}")
    return UserError(
        f"the book of {past.symbol} at {at} is unknowable: update ids "
        f"{past.from_update_id}..{past.to_update_id} were not stored ({past.reason})"
    )


async def export_book(
    database_url: str, request: ExportRequest, sink: RowSink, progress: Progress
) -> tuple[int, int]:
    """Write the book rows of ``request`` to ``sink`` (closed on the way out); (rows written,
    instants skipped because their book is unknowable). Raises `unknowable`'s error for
    ``--at``, and a like one when no instant of a series has a book."""
    symbol = request.filters.symbol
    assert symbol is not None, "checked by `build_request`"
    engine = db.make_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            # Every instant of a series from the same snapshot of the tables.
            await conn.execution_options(isolation_level="REPEATABLE READ")
            if request.at is None:
                return await _series(conn, symbol, request, sink, progress)
            past = await book_at(conn, symbol, request.at)
            if not isinstance(past, PastBook):
                shown = iso_utc(request.at) if isinstance(request.at, datetime) else request.at
                raise unknowable(past, shown)
            at = request.at if isinstance(request.at, datetime) else past.event_time
            rows = book_rows(at, past, request.depth)
            sink.write(rows)
            progress.advance(len(rows))
            return len(rows), 0
    finally:
        sink.close()
        await engine.dispose()


async def _series(
    conn: AsyncConnection, symbol: str, request: ExportRequest, sink: RowSink, progress: Progress
) -> tuple[int, int]:
    start, end, every_s = request.filters.start, request.filters.end, request.every_s
    assert start is not None, "checked by `build_request`"
    assert end is not None
    assert every_s is not None
    written = skipped = 0
    pending: list[BookRow] = []
    last: Hole | NoCheckpoint | None = None
    for moment in book_instants(start, end, every_s):
        past = await book_at(conn, symbol, moment)
        if not isinstance(past, PastBook):
            skipped, last = skipped + 1, past
            continue
        pending.extend(book_rows(moment, past, request.depth))
        if len(pending) >= request.chunk_rows:
            sink.write(pending)
            written += len(pending)
            progress.advance(len(pending))
            pending = []
    sink.write(pending)
    written += len(pending)
    if written == 0 and last is not None:
        raise unknowable(last, f"every instant from {iso_utc(start)} to {iso_utc(end)}")
    return written, skipped
