"""Running an export: table rows from ``COPY (SELECT ...) TO STDOUT (FORMAT csv)`` inside one
read-only repeatable-read transaction, so the file is one consistent snapshot, written to the file
as it arrives for CSV, parsed by Arrow into Parquet row groups of ``--chunk-rows`` for Parquet;
or the book at past instants (`depthflow.export.book`). Memory is bounded by a few blocks and one
row group whatever the table's size. The file appears under its name only once complete.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from depthflow.errors import UserError
from depthflow.export.book import export_book
from depthflow.export.files import CsvSink, ParquetFromCsv, ParquetSink, RowSink
from depthflow.export.queries import (
    BOOK_COLUMNS,
    SOURCES,
    Filters,
    Query,
    Source,
    count_query,
    select_query,
)
from depthflow.export.request import ExportRequest, ExportResult
from depthflow.progress import Progress
from depthflow.storage import db

__all__ = ["run_export"]

# The exact count behind the ETA is given up after this long (a big table, few filters): the
# planner's estimate is used instead.
_COUNT_TIMEOUT_S = 2.0
_CONNECT_TIMEOUT_S = 10.0


async def run_export(database_url: str, request: ExportRequest, progress: Progress) -> ExportResult:
    """Write the file of ``request`` from the database of ``database_url``. Raises a one-line
    `UserError` when the database cannot be used or (`book`) no book can be rebuilt."""
    started = time.monotonic()
    try:
        with db.explain_errors(database_url), _complete_file(request.out) as partial:
            try:
                if request.what == "book":
                    sink = _sink(request, partial)
                    rows, skipped = await export_book(database_url, request, sink, progress)
                else:
                    rows = await _export_table(database_url, request, partial, progress)
                    skipped = 0
            except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, DBAPIError) as exc:
                # Read-only: any revision with these tables will do, so not `check_migrated`.
                if not _schema_missing(exc):
                    raise
                raise UserError(
                    f"database {make_url(database_url).database!r}: {_schema_missing(exc)}: "
                    "run `depthflow migrate` (or point DATABASE_URL at a depthflow database)"
                ) from exc
    finally:
        progress.finish()
    size = request.out.stat().st_size
    return ExportResult(rows, request.out, size, time.monotonic() - started, skipped)


def _schema_missing(exc: BaseException) -> str | None:
    """The message of a missing table or column under ``exc`` (SQLAlchemy's wrapper or the
    driver's own), else None."""
    missing = (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError)
    for cause in (exc, getattr(getattr(exc, "orig", None), "__cause__", None)):
        if isinstance(cause, missing):
            return str(cause)
    return None


@contextlib.contextmanager
def _complete_file(path: Path) -> Iterator[Path]:
    """A hidden path beside ``path``, renamed to it on success and removed on failure."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _sink(request: ExportRequest, path: Path) -> RowSink:
    columns = BOOK_COLUMNS if request.what == "book" else SOURCES[request.what].columns
    if request.format == "parquet":
        return ParquetSink(path, columns)
    return CsvSink(_open_binary(path, gzipped=request.out.name.endswith(".gz")), columns)


def _open_binary(path: Path, *, gzipped: bool) -> IO[bytes]:
    if gzipped:
        return gzip.open(path, "wb", compresslevel=6)  # type: ignore[return-value]
    return open(path, "wb")


async def _export_table(
    database_url: str, request: ExportRequest, path: Path, progress: Progress
) -> int:
    source = SOURCES[request.what]
    conn = await asyncpg.connect(
        db.asyncpg_dsn(database_url),
        timeout=_CONNECT_TIMEOUT_S,
        server_settings={
            # COPY's text floats: the shortest that reads back to the same double (PostgreSQL
            # 12+; 17 digits before), whatever the server's default.
            "extra_float_digits": "3",
            "TimeZone": "UTC",
            "DateStyle": "ISO",
            "application_name": "depthflow export",
        },
    )
    try:
        total, exact = await _estimate(conn, source, request.filters)
        progress.begin(total, exact=exact)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if request.format == "csv":
                query = select_query(source, request.filters, text_times=True)
                gzipped = request.out.name.endswith(".gz")
                with _open_binary(path, gzipped=gzipped) as file:

                    async def write(data: bytes) -> None:
                        file.write(data)

                    return await _copy(conn, query, write, progress, header=True)
            query = select_query(source, request.filters)
            async with ParquetFromCsv(path, source.columns, request.chunk_rows) as parquet:
                return await _copy(conn, query, parquet.feed, progress, header=False)
    finally:
        await conn.close()


async def _copy(
    conn: asyncpg.Connection,
    query: Query,
    write: Callable[[bytes], Awaitable[None]],
    progress: Progress,
    *,
    header: bool,
) -> int:
    """``COPY (query) TO STDOUT (FORMAT csv)`` handed to ``write`` as it arrives; rows copied.

    Measured on 1.34 M orders rows of one symbol (2 shared cores): Parquet from COPY parsed
    by Arrow ~400k rows/s, from a server-side cursor's records converted in Python ~130k; CSV
    from COPY ~300k rows/s (formatting times as ISO-8601 with to_char costs 40% of the
    server's time, kept for the format).
    """

    async def copied(data: bytes) -> None:
        await write(data)
        # No exported text holds a newline (symbols, sides and reasons are plain words).
        progress.advance(data.count(b"\n"))

    status: str = await conn.copy_from_query(
        query.sql, *query.args, output=copied, format="csv", header=header
    )
    return int(status.split()[-1])


async def _estimate(
    conn: asyncpg.Connection, source: Source, filters: Filters
) -> tuple[int | None, bool]:
    """The rows the export will write, for the ETA, and whether that is exact: counted if that
    is quick, else the planner's estimate."""
    count = count_query(source, filters)
    try:
        return int(await conn.fetchval(count.sql, *count.args, timeout=_COUNT_TIMEOUT_S)), True
    except TimeoutError:
        query = select_query(source, filters)
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query.sql}", *query.args)
    rows = json.loads(plan)[0]["Plan"].get("Plan Rows")
    return (int(rows) if rows is not None else None), False
