"""The Binance stand-in over real loopback sockets: shapes, REST consistency, injected faults."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

from depthflow.simulate.market import Market
from depthflow.simulate.server import Simulator
from depthflow.simulate.weight import UsedWeight, depth_weight
from tests.test_market import ReferenceBook

StartSimulator = Callable[..., Awaitable[Simulator]]
WAIT_S = 10  # a hang guard only: every test finishes far sooner
# Tests read every frame the simulator sends before closing: closing with unread frames queued
# waits out websockets' close_timeout (its receive buffer is paused; python-websockets #1555).


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSimulator]:
    started: list[Simulator] = []

    async def start(symbols: tuple[str, ...] = ("btcusdt",), **options: Any) -> Simulator:
        sim = Simulator(symbols, **options)
        await sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()


def ws_url(sim: Simulator, path: str) -> str:
    return f"ws://127.0.0.1:{sim.port}{path}"


def rest(sim: Simulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}", timeout=WAIT_S)


async def recv_text(ws: ClientConnection) -> str:
    message = await asyncio.wait_for(ws.recv(), WAIT_S)
    assert isinstance(message, str)  # text frames, as Binance sends
    return message


async def recv_data(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await recv_text(ws))
    data: dict[str, Any] = frame["data"]
    return data


async def depth(sim: Simulator, **params: Any) -> httpx.Response:
    async with rest(sim) as client:
        return await client.get("/api/v3/depth", params=params)


async def recv_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every event until the server closes the connection normally."""
    events: list[dict[str, Any]] = []
    try:
        while True:
            events.append(await recv_data(ws))
    except ConnectionClosedOK:
        return events


def without_time(event: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in event.items() if key != "E"}


async def test_combined_stream_envelope_and_events_of_the_seeded_market(
    start_sim: StartSimulator,
) -> None:
    sim = await start_sim(("btcusdt", "ethusdt"), rate=0, seed=4, max_events=10)
    expected = {s: Market(s, seed=4) for s in ("btcusdt", "ethusdt")}
    names = {"btcusdt": "btcusdt@depth@100ms", "ethusdt": "ethusdt@depth"}
    async with connect(ws_url(sim, "/stream?streams=" + "/".join(names.values()))) as ws:
        for _ in range(20):
            frame = json.loads(await recv_text(ws))
            assert set(frame) == {"stream", "data"}
            data = frame["data"]
            symbol = data["s"].lower()
            assert frame["stream"] == names[symbol]
            assert set(data) == {"e", "E", "s", "U", "u", "b", "a"}
            assert isinstance(data["E"], int)
            assert data["E"] > 1_600_000_000_000
            assert without_time(data) == without_time(dict(expected[symbol].next_event(0)))


async def test_raw_stream_sends_bare_events(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt", "ethusdt"), rate=0, max_events=5)
    async with connect(ws_url(sim, "/ws/ethusdt@depth@100ms")) as ws:
        for _ in range(5):
            event = json.loads(await recv_text(ws))
            assert event["e"] == "depthUpdate"
            assert event["s"] == "ETHUSDT"
            assert "stream" not in event


async def test_rest_snapshot_is_a_point_of_the_stream_and_events_complete_it(
    start_sim: StartSimulator,
) -> None:
    sim = await start_sim(("btcusdt",), rate=0, max_events=300, seed=6)
    initial = Market("btcusdt", seed=6).last_update_id
    async with connect(ws_url(sim, "/stream?streams=btcusdt@depth@100ms")) as ws:
        events = [await recv_data(ws) for _ in range(3)]
        response = await depth(sim, symbol="BTCUSDT", limit=5000)
        events += [await recv_data(ws) for _ in range(297)]
    await asyncio.wait_for(sim.done.wait(), WAIT_S)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    snapshot = response.json()
    last = snapshot["lastUpdateId"]
    assert last in {initial} | {e["u"] for e in events}
    pending = [e for e in events if e["u"] > last]
    if pending:  # Binance's rule for the first event applied after a snapshot
        assert pending[0]["U"] <= last + 1 <= pending[0]["u"]
    book = ReferenceBook(snapshot)
    for event in pending:
        book.apply(event)  # type: ignore[arg-type]
    assert book.as_snapshot() == sim.markets["btcusdt"].snapshot(5000)
    assert sim.events_generated == {"btcusdt": 300}


async def test_rest_limit_and_errors(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0)
    top = (await depth(sim, symbol="BTCUSDT", limit=2)).json()
    assert len(top["bids"]) == len(top["asks"]) == 2
    default = (await depth(sim, symbol="btcusdt")).json()
    assert len(default["bids"]) == 100  # Binance's default limit; the book starts 100 deep
    unknown = await depth(sim, symbol="DOGEUSDT")
    assert unknown.status_code == 400
    assert unknown.json() == {"code": -1121, "msg": "Invalid symbol."}
    assert (await depth(sim)).json()["code"] == -1102
    assert (await depth(sim, symbol="BTCUSDT", limit="x")).json()["code"] == -1100
    async with rest(sim) as client:
        assert (await client.get("/api/v3/ticker")).status_code == 404
        assert (await client.get("/")).status_code == 404


async def test_unknown_stream_is_refused_at_the_handshake(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0)
    for path in ("/ws/dogeusdt@depth", "/stream?streams=btcusdt@trade", "/stream"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(sim, path)):
                pass
        assert refused.value.response.status_code == 400
    with pytest.raises(InvalidStatus) as missing:
        async with connect(ws_url(sim, "/nowhere")):
            pass
    assert missing.value.response.status_code == 404


async def test_gap_every_drops_events_from_the_stream_only(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0, gap_every=5, max_events=50)
    async with connect(ws_url(sim, "/ws/btcusdt@depth")) as ws:
        events = [json.loads(await recv_text(ws)) for _ in range(40)]
    await asyncio.wait_for(sim.done.wait(), WAIT_S)
    gaps = sum(1 for a, b in itertools.pairwise(events) if b["U"] != a["u"] + 1)
    assert gaps == 9  # events 5, 10, ... 45 missing between frames; 50 is the trailing one
    assert sim.events_generated == {"btcusdt": 50}
    assert sim.frames_sent == 40
    assert set(sim.markets["btcusdt"].true_wap) > {e["u"] for e in events}


def classify(text: str) -> str:
    try:
        data = json.loads(text)["data"]
    except ValueError:
        return "not_json"
    if data["e"] != "depthUpdate":
        return "unknown_event"
    try:
        [float(x) for level in data["b"] + data["a"] for x in level]
    except ValueError:
        return "wrong_type"
    return "ok"


async def test_malformed_every_adds_bad_frames_and_keeps_every_event(
    start_sim: StartSimulator,
) -> None:
    sim = await start_sim(("btcusdt",), rate=0, malformed_every=3, max_events=30)
    async with connect(ws_url(sim, "/stream?streams=btcusdt@depth@100ms")) as ws:
        texts = [await recv_text(ws) for _ in range(40)]
    kinds = [classify(text) for text in texts]
    assert [kind == "ok" for kind in kinds] == [True, True, True, False] * 10
    assert set(kinds) == {"ok", "not_json", "wrong_type", "unknown_event"}
    events = [json.loads(t)["data"] for t, k in zip(texts, kinds, strict=True) if k == "ok"]
    assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(events))
    assert len(events) == 30


async def test_disconnect_every_closes_after_n_frames_and_allows_reconnect(
    start_sim: StartSimulator,
) -> None:
    sim = await start_sim(("btcusdt",), rate=0, disconnect_every=5)
    url = ws_url(sim, "/stream?streams=btcusdt@depth@100ms")
    async with connect(url) as ws:
        first = await recv_until_closed(ws)
        assert ws.close_code == 1001
    assert len(first) == 5
    async with connect(url) as ws:
        second = [await recv_data(ws) for _ in range(5)]
    # At rate 0 the market waits for a subscriber, so nothing is generated in between.
    assert second[0]["U"] == first[-1]["u"] + 1


async def test_prebuild_serves_book_as_of_the_frames_sent(start_sim: StartSimulator) -> None:
    symbols = ("btcusdt", "ethusdt")
    sim = await start_sim(symbols, prebuild=100, seed=8)
    assert sim.events_generated == {"btcusdt": 100, "ethusdt": 100}
    assert sim.frames_sent == 0
    before = (await depth(sim, symbol="BTCUSDT", limit=5000)).json()
    # The true market is 100 events ahead; REST answers for the position reached by the stream.
    assert before == dict(Market("btcusdt", seed=8).snapshot(5000))
    async with connect(ws_url(sim, "/stream?streams=btcusdt@depth@100ms/ethusdt@depth")) as ws:
        received = [await recv_data(ws) for _ in range(50)]
        middle = (await depth(sim, symbol="BTCUSDT", limit=5000)).json()
        received += [await recv_data(ws) for _ in range(150)]
        await asyncio.wait_for(sim.done.wait(), WAIT_S)
    assert sim.frames_sent == 200
    btc = [e for e in received if e["s"] == "BTCUSDT"]
    assert len(btc) == 100
    assert btc[0]["U"] == before["lastUpdateId"] + 1
    assert middle["lastUpdateId"] in {before["lastUpdateId"]} | {e["u"] for e in btc}
    book = ReferenceBook(middle)
    for event in btc:
        if event["u"] > middle["lastUpdateId"]:
            book.apply(event)  # type: ignore[arg-type]
    final = sim.markets["btcusdt"].snapshot(5000)
    assert book.as_snapshot() == final
    assert (await depth(sim, symbol="BTCUSDT", limit=5000)).json() == dict(final)


async def test_prebuild_with_gaps_sends_the_rest_then_done(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), prebuild=20, gap_every=4)
    async with connect(ws_url(sim, "/ws/btcusdt@depth@100ms")) as ws:
        events = [json.loads(await recv_text(ws)) for _ in range(15)]
        await asyncio.wait_for(sim.done.wait(), WAIT_S)
    assert sim.frames_sent == 15
    final = (await depth(sim, symbol="BTCUSDT")).json()
    assert final["lastUpdateId"] == sim.markets["btcusdt"].last_update_id > events[-1]["u"]


async def test_paced_market_generates_nothing_before_the_first_subscriber(
    start_sim: StartSimulator,
) -> None:
    symbols = ("btcusdt", "ethusdt")
    sim = await start_sim(symbols, rate=500, seed=5, max_events=20)
    await asyncio.sleep(0.3)  # the 20 events' worth of time, several times over
    assert sim.events_generated == {"btcusdt": 0, "ethusdt": 0}
    assert not sim.started.is_set()
    assert not sim.done.is_set()
    assert sim.frames_sent == 0
    snapshot = (await depth(sim, symbol="BTCUSDT", limit=5000)).json()
    assert snapshot == dict(Market("btcusdt", seed=5).snapshot(5000))

    loop = asyncio.get_running_loop()
    async with connect(ws_url(sim, "/ws/btcusdt@depth@100ms")) as ws:
        began = loop.time()
        events = [json.loads(await recv_text(ws)) for _ in range(20)]
        await asyncio.wait_for(sim.done.wait(), WAIT_S)
        elapsed = loop.time() - began
    assert sim.started.is_set()
    # The first event continues the snapshot taken before subscribing, and none is missing.
    assert events[0]["U"] == snapshot["lastUpdateId"] + 1
    assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(events))
    book = ReferenceBook(snapshot)
    for event in events:
        book.apply(event)
    assert book.as_snapshot() == sim.markets["btcusdt"].snapshot(5000)
    # Paced from the subscription on: 20 events at 500/s take at least 19 intervals.
    assert elapsed >= 19 / 500
    assert sim.events_generated == {"btcusdt": 20, "ethusdt": 20}
    assert sim.frames_sent == 20  # ethusdt's events went to nobody
    assert len(sim.markets["ethusdt"].true_wap) == 20


async def test_paced_market_moves_on_between_connections(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=200, disconnect_every=5)
    url = ws_url(sim, "/stream?streams=btcusdt@depth@100ms")
    async with connect(url) as ws:
        first = await recv_until_closed(ws)
        assert ws.close_code == 1001
    assert len(first) == 5
    # Like an exchange, once started the market moves with nobody connected.
    async with asyncio.timeout(WAIT_S):
        while sim.events_generated["btcusdt"] < 15:  # noqa: ASYNC110 (a plain counter)
            await asyncio.sleep(0.01)
    async with connect(url) as ws:
        second = await recv_until_closed(ws)
    assert len(second) == 5
    assert second[0]["U"] > first[-1]["u"] + 1
    assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(second))


# -- request weight -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "weight"),
    [(1, 5), (100, 5), (101, 25), (500, 25), (501, 50), (1000, 50), (1001, 250), (5000, 250)],
)
def test_depth_weight_follows_binance_limits(limit: int, weight: int) -> None:
    assert depth_weight(limit) == weight


def test_used_weight_counts_a_rolling_minute_per_client() -> None:
    now = [1000.0]
    used = UsedWeight(clock=lambda: now[0])
    assert used.add("10.0.0.1", 5) == 5
    now[0] += 30
    assert used.add("10.0.0.1", 25) == 30
    assert used.add("10.0.0.2", 250) == 250  # counted per address
    now[0] += 29.9
    assert used.add("10.0.0.1", 5) == 35
    now[0] += 0.2  # the first request is now more than a minute old
    assert used.add("10.0.0.1", 50) == 80
    now[0] += 61
    assert used.add("10.0.0.1", 5) == 5
    assert used.add("10.0.0.2", 5) == 5


async def test_depth_reports_used_weight_of_the_last_minute(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0)
    used = []
    async with rest(sim) as client:
        for params in (
            {"limit": 100},
            {"limit": 500},
            {"limit": 1000},
            {"limit": 5000},
            {},  # default limit 100
            {"limit": 9999},  # served as 5000
        ):
            response = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", **params})
            assert response.status_code == 200
            used.append(int(response.headers["X-MBX-USED-WEIGHT-1M"]))
        error = await client.get("/api/v3/depth", params={"symbol": "DOGEUSDT"})
        assert error.status_code == 400
        assert error.headers["x-mbx-used-weight-1m"] == str(used[-1] + 5)
        other = await client.get("/api/v3/ticker")
        assert "x-mbx-used-weight-1m" not in other.headers
    assert used == [5, 30, 80, 330, 335, 585]
