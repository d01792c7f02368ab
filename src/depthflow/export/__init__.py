"""`depthflow export`: one table's stored rows, or the stored book at past instants, streamed to
a Parquet or CSV file in constant memory (SPEC "CLI").

`request` checks the command line, `queries` builds the SQL, `files` writes Parquet and CSV and
draws the progress line, `book` rebuilds past books, `run` ties them to the database.
"""

from depthflow.export.queries import BOOK_COLUMNS, SOURCES, Filters, Query, Source
from depthflow.export.request import (
    CHUNK_ROWS,
    WHATS,
    ExportRequest,
    ExportResult,
    build_request,
    parse_instant,
    parse_time,
)
from depthflow.export.run import run_export

__all__ = [
    "BOOK_COLUMNS",
    "CHUNK_ROWS",
    "SOURCES",
    "WHATS",
    "ExportRequest",
    "ExportResult",
    "Filters",
    "Query",
    "Source",
    "build_request",
    "parse_instant",
    "parse_time",
    "run_export",
]
