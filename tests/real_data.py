"""Binance's own recordings beside the repository (``../shared/data/binance``), as recordings of
depthflow's format."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest

from depthflow.recording import RecordingWriter

SPOT = Path(__file__).resolve().parents[2] / "shared/data/binance/spot-2024-08-08"
# The recordings' first 2 events are older than their snapshot (Binance's procedure: the stream
# starts first); the snapshot is recorded after them, as a live client would have received it.
SNAPSHOT_AFTER = 2


def spot_frames(symbol: str) -> Iterator[tuple[float, str]]:
    """(receive time in s, frame text) of a symbol's recording; skips the test without it."""
    frames = SPOT / f"{symbol}.depth.frames.gz"
    if not frames.exists():
        pytest.skip(f"{frames} is not there")
    with gzip.open(frames, "rt", encoding="utf-8") as lines:
        for line in lines:
            received_ns, raw = line.rstrip("\n").split(" ", 1)
            yield int(received_ns) / 1e9, raw


def write_spot_recording(symbol: str, path: Path) -> Path:
    """The symbol's frames with its REST snapshot where a live client would have had it."""
    snapshot = (SPOT / f"{symbol}.snapshot.json").read_text()
    with RecordingWriter(path) as writer:
        for n, (received_at, raw) in enumerate(spot_frames(symbol)):
            writer.write_frame(received_at, raw)
            if n + 1 == SNAPSHOT_AFTER:
                writer.write_snapshot(received_at, symbol, snapshot)
    return path
