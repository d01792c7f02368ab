"""NDJSON recordings: round trip, clear errors on bad lines, and served back by the simulator."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect

from depthflow.recording import (
    RecordedFrame,
    RecordedSnapshot,
    RecordingError,
    RecordingWriter,
    read_recording,
)
from depthflow.simulate.frames import envelope
from depthflow.simulate.market import Market
from depthflow.simulate.server import Simulator

WAIT_S = 10  # hang guard only


@pytest.mark.parametrize("name", ["session.ndjson", "session.ndjson.gz"])
def test_round_trip_keeps_order_and_raw_text(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    frame = '{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","u":5}}'
    with RecordingWriter(path) as writer:
        writer.write_snapshot(1.5, "BTCUSDT", b'{"lastUpdateId":4,"bids":[],"asks":[]}')
        writer.write_frame(2.25, frame)
        writer.write_frame(3.0, 'not json, "quoted"\n')
    assert (writer.frames_written, writer.snapshots_written) == (2, 1)
    assert list(read_recording(path)) == [
        RecordedSnapshot(1.5, "btcusdt", '{"lastUpdateId":4,"bids":[],"asks":[]}'),
        RecordedFrame(2.25, frame),
        RecordedFrame(3.0, 'not json, "quoted"\n'),
    ]
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as handle:
        lines = [json.loads(line) for line in handle]
    assert lines[1] == {"kind": "frame", "t": 2.25, "raw": frame}
    assert list(lines[0]) == ["kind", "t", "symbol", "raw"]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.ndjson"
    path.write_text('\n{"kind":"frame","t":1.0,"raw":"x"}\n\n')
    assert list(read_recording(path)) == [RecordedFrame(1.0, "x")]


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        '{"kind":"trade","t":1.0,"raw":"x"}',
        '{"kind":"frame","t":"soon","raw":"x"}',
        '{"kind":"snapshot","t":1.0,"raw":"x"}',
    ],
)
def test_bad_line_raises_naming_the_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_text('{"kind":"frame","t":1.0,"raw":"ok"}\n' + bad + "\n")
    items = read_recording(path)
    assert next(items) == RecordedFrame(1.0, "ok")
    with pytest.raises(RecordingError, match=r"bad\.ndjson:2: bad recording line"):
        next(items)


def test_truncated_gzip_raises_after_the_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "cut.ndjson.gz"
    with RecordingWriter(path) as writer:
        for i in range(200):
            writer.write_frame(float(i), "x" * 50 + str(i))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(RecordingError, match="unreadable after line"):
        list(read_recording(path))


def _frames_and_snapshots(path: Path) -> tuple[list[str], list[str]]:
    """A recording of 40 real frames (two symbols), one garbage frame, three snapshots."""
    markets = {s: Market(s, seed=3) for s in ("btcusdt", "ethusdt")}
    frames: list[str] = []
    snapshots: list[str] = []
    with RecordingWriter(path) as writer:
        for market in markets.values():
            body = msgspec.json.encode(market.snapshot(1000)).decode()
            snapshots.append(body)
            writer.write_snapshot(0.0, market.symbol, body)
        for i in range(20):
            for symbol, market in markets.items():
                data = msgspec.json.encode(market.next_event(i)).decode()
                frames.append(envelope(f"{symbol}@depth@100ms", data))
                writer.write_frame(float(i), frames[-1])
            if i == 9:
                frames.append("garbage{")
                writer.write_frame(9.5, "garbage{")
                body = msgspec.json.encode(markets["btcusdt"].snapshot(1000)).decode()
                snapshots.append(body)
                writer.write_snapshot(9.5, "btcusdt", body)
    return frames, snapshots


@pytest.fixture
async def replaying(tmp_path: Path) -> AsyncIterator[tuple[Simulator, list[str], list[str]]]:
    path = tmp_path / "session.ndjson.gz"
    frames, snapshots = _frames_and_snapshots(path)
    sim = Simulator(["btcusdt"], replay=path, rate=0)
    await sim.start()
    yield sim, frames, snapshots
    await sim.stop()


async def test_replay_serves_recorded_frames_and_snapshot_as_of_the_stream(
    replaying: tuple[Simulator, list[str], list[str]],
) -> None:
    sim, frames, snapshots = replaying
    assert sim.symbols == ["btcusdt", "ethusdt"]  # ethusdt comes from the recording
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}") as client:

        async def snapshot(symbol: str) -> str:
            response = await client.get("/api/v3/depth", params={"symbol": symbol})
            assert response.status_code == 200
            return response.text

        assert await snapshot("BTCUSDT") == snapshots[0]  # nothing sent yet: the first one
        url = f"ws://127.0.0.1:{sim.port}/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms"
        async with connect(url) as ws:
            received = [await asyncio.wait_for(ws.recv(), WAIT_S) for _ in frames]
        await asyncio.wait_for(sim.done.wait(), WAIT_S)
        assert received == frames
        assert sim.frames_sent == len(frames)
        assert await snapshot("BTCUSDT") == snapshots[2]  # the latest not ahead of the stream
        assert await snapshot("ETHUSDT") == snapshots[1]
        assert (await client.get("/api/v3/depth", params={"symbol": "XRPUSDT"})).status_code == 400


async def test_replay_to_a_raw_stream_sends_bare_events(
    replaying: tuple[Simulator, list[str], list[str]],
) -> None:
    sim, frames, _ = replaying
    btc = [f for f in frames if "btcusdt" in f or f == "garbage{"]
    async with connect(f"ws://127.0.0.1:{sim.port}/ws/btcusdt@depth") as ws:
        received = [await asyncio.wait_for(ws.recv(), WAIT_S) for _ in btc]
    assert received[10] == "garbage{"  # unattributable frames go to everyone, verbatim
    assert [json.loads(r) for r in received if r != "garbage{"] == [
        json.loads(f)["data"] for f in btc if f != "garbage{"
    ]
