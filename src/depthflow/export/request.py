"""The command line of `depthflow export`, checked and parsed before any connection: what to
export, the filters, the format; and what an export reports when done."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

from depthflow.errors import EXIT_USAGE, UserError
from depthflow.export.files import require_pyarrow
from depthflow.export.queries import Filters

__all__ = [
    "CHUNK_ROWS",
    "WHATS",
    "ExportRequest",
    "ExportResult",
    "Format",
    "build_request",
    "parse_instant",
    "parse_time",
]

Format = Literal["parquet", "csv"]
WHATS = ("ticks", "orders", "signals", "gaps", "book")
# Rows per Parquet row group (and per write of `book` rows).
CHUNK_ROWS = 50_000


def parse_time(value: str, option: str) -> datetime:
    """An ISO-8601 time with a zone (``Z`` accepted), or a date alone (midnight UTC)."""
    text = value.strip()
    with contextlib.suppress(ValueError):
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _usage(
            f"{option} {value!r} is not an ISO-8601 time (e.g. 2024-08-08T23:59:30Z or 2024-08-08)"
        ) from None
    if moment.tzinfo is None:
        raise _usage(f"{option} {value!r} has no time zone (add Z or +00:00)")
    return moment.astimezone(UTC)


def parse_instant(value: str) -> int | datetime:
    """``--at``: an update id (digits), or a time as `parse_time` reads it."""
    text = value.strip()
    return int(text) if text.isdigit() else parse_time(text, "--at")


@dataclass(frozen=True, slots=True)
class ExportRequest:
    what: str
    out: Path
    format: Format
    filters: Filters
    at: int | datetime | None = None
    every_s: float | None = None
    depth: int | None = None
    chunk_rows: int = CHUNK_ROWS


@dataclass(frozen=True, slots=True)
class ExportResult:
    rows: int
    path: Path
    bytes: int
    seconds: float
    skipped: int = 0  # `book --every`: instants whose book is unknowable

    def summary(self) -> str:
        skipped = f"; {self.skipped:,} unknowable instant(s) skipped" if self.skipped else ""
        return (
            f"exported {self.rows:,} rows to {self.path} ({_size(self.bytes)}) "
            f"in {self.seconds:.1f} s{skipped}"
        )


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for larger in ("kB", "MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, larger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _usage(message: str) -> UserError:
    return UserError(message, exit_code=EXIT_USAGE)


def build_request(
    what: str,
    out: Path,
    *,
    format: str | None = None,
    symbol: str | None = None,
    start: str | None = None,
    end: str | None = None,
    at: str | None = None,
    every_s: float | None = None,
    depth: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ExportRequest:
    """The command line's values checked and parsed; a `UserError` (exit 2) names a bad one.
    ``format`` None: csv when ``out`` ends in .csv or .csv.gz, else parquet."""
    if what not in WHATS:
        raise _usage(f"cannot export {what!r}: choose one of {', '.join(WHATS)}")
    if format is None:
        format = "csv" if out.name.endswith((".csv", ".csv.gz")) else "parquet"
    if format not in ("parquet", "csv"):
        raise _usage(f"--format {format!r}: choose parquet or csv")
    if format == "parquet":
        require_pyarrow()
    if not out.parent.is_dir():
        raise _usage(f"--out {out}: directory {out.parent} does not exist")
    filters = Filters(
        symbol.strip().upper() if symbol else None,
        parse_time(start, "--start") if start is not None else None,
        parse_time(end, "--end") if end is not None else None,
    )
    if filters.start and filters.end and filters.start >= filters.end:
        raise _usage(f"--start {start} is not before --end {end}")
    instant = parse_instant(at) if at is not None else None
    if what == "book":
        _check_book(filters, instant, every_s)
    elif instant is not None or every_s is not None or depth is not None:
        raise _usage("--at, --every and --depth are for `depthflow export book` only")
    chosen: Format = "csv" if format == "csv" else "parquet"
    return ExportRequest(what, out, chosen, filters, instant, every_s, depth, chunk_rows)


def _check_book(filters: Filters, at: int | datetime | None, every_s: float | None) -> None:
    if filters.symbol is None:
        raise _usage("export book needs --symbol")
    if (at is None) == (every_s is None):
        raise _usage("export book needs either --at, or --every with --start and --end")
    if every_s is not None and (filters.start is None or filters.end is None):
        raise _usage("export book --every needs --start and --end")
    if at is not None and (filters.start or filters.end):
        raise _usage("export book --at takes no --start/--end (they go with --every)")
