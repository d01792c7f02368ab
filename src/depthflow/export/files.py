"""The file side of `depthflow export`: Parquet and CSV writers.

No database here: a sink is handed chunks of rows (any sequences in column order),
`ParquetFromCsv` the bytes of a CSV stream; each writes to the path or file it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol, Self

from depthflow.errors import EXIT_USAGE, UserError

__all__ = [
    "Column",
    "CsvSink",
    "Kind",
    "ParquetFromCsv",
    "ParquetSink",
    "RowSink",
    "iso_utc",
    "require_pyarrow",
]

Kind = Literal["time", "float", "int", "text"]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind


class RowSink(Protocol):
    def write(self, rows: Sequence[Sequence[Any]]) -> None: ...

    def close(self) -> None: ...


def require_pyarrow() -> None:
    """Raise a `UserError` (exit 2) saying how to install pyarrow when it is missing."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(
            "--format parquet needs pyarrow: pip install 'depthflow[export]' (or use --format csv)",
            exit_code=EXIT_USAGE,
        ) from None


def _arrow_schema(columns: Sequence[Column]) -> Any:
    import pyarrow as pa

    types = {
        "time": pa.timestamp("us", tz="UTC"),
        "float": pa.float64(),
        "int": pa.int64(),
        "text": pa.string(),
    }
    return pa.schema([pa.field(c.name, types[c.kind]) for c in columns])


def _parquet_writer(path: Path, schema: Any) -> Any:
    import pyarrow.parquet as pq

    # zstd: about gzip's size at snappy's speed; pandas, polars, DuckDB and Spark read it.
    return pq.ParquetWriter(str(path), schema, compression="zstd")


class ParquetSink:
    """One Parquet row group per `write` of Python rows; times as timestamp[us, UTC], floats as
    float64, ids as int64, words as string."""

    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        import pyarrow as pa

        self._pa = pa
        self.schema = _arrow_schema(columns)
        self._writer = _parquet_writer(path, self.schema)

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        pa = self._pa
        columns = zip(*rows, strict=True)
        arrays = [
            pa.array(values, type=f.type) for values, f in zip(columns, self.schema, strict=True)
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=len(rows))

    def close(self) -> None:
        self._writer.close()


# Bytes handed to the parsing thread at a time, and how many such blocks may wait for it: the
# memory bound of `ParquetFromCsv` (COPY's own messages are ~8 kB: one at a time costs 25%).
_BLOCK_BYTES = 1 << 20
_BLOCKS_QUEUED = 8


class ParquetFromCsv:
    """Parquet row groups of ``chunk_rows`` from CSV text as ``COPY ... TO STDOUT (FORMAT csv)``
    streams it (no header, NULL as an empty field), parsed by Arrow in a thread of its own.

    An async context manager: `feed` queues the bytes, waiting while the thread is
    ``_BLOCKS_QUEUED`` blocks behind; leaving the block waits for the file to be complete and
    raises what the thread raised.
    """

    def __init__(self, path: Path, columns: Sequence[Column], chunk_rows: int) -> None:
        self._path = path
        self._schema = _arrow_schema(columns)
        self._chunk_rows = chunk_rows
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_BLOCKS_QUEUED)
        self._pending = bytearray()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="export-parquet", daemon=True)

    async def __aenter__(self) -> Self:
        self._thread.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        await self._put(bytes(self._pending))
        self._pending.clear()
        await self._put(None)
        await asyncio.to_thread(self._thread.join)
        if exc_type is None and self._error is not None:
            raise self._error

    async def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self._path} failed: {self._error}")
        self._pending += data
        if len(self._pending) >= _BLOCK_BYTES:
            await self._put(bytes(self._pending))
            self._pending.clear()

    async def _put(self, block: bytes | None) -> None:
        try:
            self._queue.put_nowait(block)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, block)

    def _run(self) -> None:
        source = _QueueReader(self._queue)
        try:
            self._convert(source)
        except BaseException as exc:
            self._error = exc
            # Keep taking blocks up to the end: the producer stops at its next `feed`, and is
            # never left waiting on a full queue. Arrow may still have a read in flight on an
            # I/O thread of its own, which can take the end marker first (then `eof`).
            while not source.eof:
                with contextlib.suppress(queue.Empty):
                    if self._queue.get(timeout=0.05) is None:
                        # Put the end back: Arrow's read-ahead thread may still ask for a block,
                        # and one that never comes holds it, and the interpreter's exit, forever.
                        self._queue.put(None)
                        break

    def _convert(self, source: _QueueReader) -> None:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        if source.empty():
            # Arrow refuses an empty CSV stream; no rows is a file with the schema alone.
            _parquet_writer(self._path, self._schema).close()
            return
        reader = pacsv.open_csv(
            source,
            # One parsing thread (this one): as fast here, where COPY is the bottleneck, and
            # without Arrow's read-ahead of blocks.
            read_options=pacsv.ReadOptions(
                column_names=self._schema.names, block_size=_BLOCK_BYTES, use_threads=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=self._schema, null_values=[""], strings_can_be_null=False
            ),
        )
        writer = _parquet_writer(self._path, self._schema)
        try:
            pending: list[Any] = []
            rows = 0
            for batch in reader:
                pending.append(batch)
                rows += batch.num_rows
                while rows >= self._chunk_rows:
                    table = pa.Table.from_batches(pending, schema=self._schema)
                    writer.write_table(table.slice(0, self._chunk_rows), self._chunk_rows)
                    rest = table.slice(self._chunk_rows)
                    pending, rows = rest.to_batches(), rest.num_rows
            if rows:
                writer.write_table(pa.Table.from_batches(pending, schema=self._schema), rows)
        finally:
            writer.close()


class _QueueReader:
    """The read side of the queue as the binary file Arrow's CSV reader reads; None is EOF."""

    closed = False

    def __init__(self, blocks: queue.Queue[bytes | None]) -> None:
        self._blocks = blocks
        self._buffer = bytearray()
        self.eof = False  # the None was taken

    def empty(self) -> bool:
        """Whether the stream ends without a byte (waits for a first byte or the end)."""
        self._fill(1)
        return not self._buffer

    def _fill(self, size: int) -> None:
        while not self.eof and (size < 0 or len(self._buffer) < size):
            block = self._blocks.get()
            if block is None:
                self.eof = True
            else:
                self._buffer += block

    def read(self, size: int = -1) -> bytes:
        self._fill(size)
        size = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        with memoryview(self._buffer) as view:
            data = bytes(view[:size])
        del self._buffer[:size]
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def iso_utc(moment: datetime | None) -> str | None:
    """``2024-08-08T23:59:30.123000Z``: what the CSV export (and the API) writes for a time."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CsvSink:
    """A header row, then one line per row: times by `iso_utc`, floats by ``repr`` (they read
    back to the same double), NULL as an empty field; ``\\n`` line ends, as COPY writes them."""

    def __init__(self, file: IO[bytes], columns: Sequence[Column]) -> None:
        self._text = io.TextIOWrapper(file, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow([c.name for c in columns])
        self._times = [i for i, c in enumerate(columns) if c.kind == "time"]

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        self._csv.writerows(self._formatted(rows))

    def _formatted(self, rows: Iterable[Sequence[Any]]) -> Iterable[list[Any]]:
        for row in rows:
            values = list(row)
            for i in self._times:
                values[i] = iso_utc(values[i])
            yield values

    def close(self) -> None:
        self._text.close()
