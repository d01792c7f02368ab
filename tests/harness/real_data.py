"""Binance's own recordings beside the repository (``../shared/data/binance``), as recordings of
depthflow's format (what `depthflow record` writes, `depthflow replay` and
`depthflow simulate --replay` read)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from depthflow.recording import RecordingWriter

__all__ = [
    "SNAPSHOT_AFTER",
    "SPOT",
    "SPOT_SYMBOLS",
    "available",
    "spot_frames",
    "write_spot_recording",
]

SPOT = Path(__file__).resolve().parents[3] / "shared/data/binance/spot-2024-08-08"
SPOT_SYMBOLS = ("btcusdt", "ethusdt")
# The recordings' first 2 events of each symbol are older than its snapshot (Binance's procedure:
# the stream starts first); the snapshot is recorded after them, as a live client would have
# received it.
SNAPSHOT_AFTER = 2


def available() -> bool:
    """Whether the recordings are there (tests skip without them)."""
    return all((SPOT / f"{symbol}.depth.frames.gz").exists() for symbol in SPOT_SYMBOLS)


def spot_frames(stream: str) -> Iterator[tuple[float, str]]:
    """(receive time in s, frame text) of ``btcusdt``, ``ethusdt`` or ``combined`` (both
    symbols in receive order, as one connection saw them)."""
    with gzip.open(SPOT / f"{stream}.depth.frames.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            received_ns, raw = line.rstrip("\n").split(" ", 1)
            yield int(received_ns) / 1e9, raw


def write_spot_recording(stream: str, path: Path) -> Path:
    """The frames of ``stream`` (a symbol or ``combined``) with each symbol's REST snapshot
    where a live client would have had it: after that symbol's `SNAPSHOT_AFTER`-th frame."""
    snapshots = {s: (SPOT / f"{s}.snapshot.json").read_text() for s in SPOT_SYMBOLS}
    seen: Counter[str] = Counter()
    with RecordingWriter(path) as writer:
        for received_at, raw in spot_frames(stream):
            writer.write_frame(received_at, raw)
            symbol = str(json.loads(raw)["stream"]).split("@", 1)[0]
            seen[symbol] += 1
            if seen[symbol] == SNAPSHOT_AFTER:
                writer.write_snapshot(received_at, symbol, snapshots[symbol])
    return path
