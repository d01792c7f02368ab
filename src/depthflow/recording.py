"""NDJSON recordings of what the feed received: every frame and every REST snapshot, timestamped.

One JSON object per line, gzip-compressed when the path ends with ``.gz``::

    {"kind":"frame","t":1718000000.123,"raw":"<frame text>"}
    {"kind":"snapshot","t":1718000000.456,"symbol":"btcusdt","raw":"<response body>"}

``t`` is the receive time in epoch seconds. ``raw`` is kept verbatim (not re-encoded) so a replay
exercises the decoder on exactly the bytes Binance sent, malformed ones included.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import msgspec

__all__ = [
    "RecordedFrame",
    "RecordedSnapshot",
    "RecordingError",
    "RecordingWriter",
    "read_recording",
]


class RecordedFrame(msgspec.Struct, frozen=True, tag_field="kind", tag="frame"):
    """One websocket frame as received."""

    received_at: float = msgspec.field(name="t")
    raw: str


class RecordedSnapshot(msgspec.Struct, frozen=True, tag_field="kind", tag="snapshot"):
    """One ``GET /api/v3/depth`` response body for ``symbol`` (lower case)."""

    received_at: float = msgspec.field(name="t")
    symbol: str
    raw: str


Recorded = RecordedFrame | RecordedSnapshot


class RecordingError(ValueError):
    """A recording that cannot be read; the message names the file and line."""


def _open(path: Path, mode: str) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, mode)  # type: ignore[return-value]
    return open(path, mode)


class RecordingWriter:
    """Append frames and snapshots to ``path`` (truncating it); use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frames_written = 0
        self.snapshots_written = 0
        self._file = _open(path, "wb")
        self._encoder = msgspec.json.Encoder()

    def write_frame(self, received_at: float, raw: str) -> None:
        self._write(RecordedFrame(received_at, raw))
        self.frames_written += 1

    def write_snapshot(self, received_at: float, symbol: str, raw: str | bytes) -> None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        self._write(RecordedSnapshot(received_at, symbol.lower(), text))
        self.snapshots_written += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self, item: Recorded) -> None:
        self._file.write(self._encoder.encode(item) + b"\n")


_decoder: msgspec.json.Decoder[Recorded] = msgspec.json.Decoder(Recorded)


def read_recording(path: Path) -> Iterator[Recorded]:
    """Yield the recording's items in order; raise `RecordingError` naming a bad line.

    Blank lines are skipped. A gzip file cut short (writer killed mid-run) raises too, after the
    complete lines before the cut have been yielded.
    """
    with _open(path, "rb") as handle:
        line_number = 0
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                yield _decode_line(path, line_number, line)
        except (EOFError, gzip.BadGzipFile) as exc:
            raise RecordingError(f"{path}: unreadable after line {line_number}: {exc}") from exc


def _decode_line(path: Path, line_number: int, line: bytes) -> Recorded:
    try:
        return _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RecordingError(f"{path}:{line_number}: bad recording line: {exc}") from None
