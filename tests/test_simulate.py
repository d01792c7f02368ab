"""The Binance stand-in over real loopback sockets: shapes, REST consistency, injected faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

from depthflow.simulate.activity import generated_symbols, symbol_rates
from depthflow.simulate.market import Market
from depthflow.simulate.server import Simulator
from depthflow.simulate.shaped import ShapedMarket
from depthflow.simulate.weight import RateLimiter, Verdict, depth_weight
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


@pytest.mark.parametrize("market", [Market, ShapedMarket])
def test_a_clone_goes_on_with_the_same_events_without_wap_history(market: type[Market]) -> None:
    original = market("btcusdt", seed=3)
    for _ in range(40):
        original.next_event(0)
    twin = original.clone()
    assert twin.snapshot(5000) == original.snapshot(5000)
    assert twin.true_wap == {}
    ahead = [original.next_event(0) for _ in range(60)]
    assert [twin.next_event(0) for _ in range(60)] == ahead
    assert twin.snapshot(5000) == original.snapshot(5000)
    assert twin.true_wap == {}  # a twin records nothing


async def test_prebuild_snapshot_far_into_the_stream_is_the_book_at_that_frame(
    start_sim: StartSimulator,
) -> None:
    # Far enough for the REST side to start from a twin of the market, not from its start.
    sim = await start_sim(("btcusdt",), prebuild=1200, seed=9)
    async with connect(ws_url(sim, "/ws/btcusdt@depth")) as ws:
        received = [json.loads(await recv_text(ws)) for _ in range(700)]
        snapshot = (await depth(sim, symbol="BTCUSDT", limit=5000)).json()
        received += [json.loads(await recv_text(ws)) for _ in range(500)]
    assert snapshot["lastUpdateId"] >= received[699]["u"]
    reference = Market("btcusdt", seed=9)
    while reference.last_update_id < snapshot["lastUpdateId"]:
        reference.next_event(0)
    assert snapshot == dict(reference.snapshot(5000))


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

    async with connect(ws_url(sim, "/ws/btcusdt@depth@100ms")) as ws:
        events = [json.loads(await recv_text(ws)) for _ in range(20)]
        await asyncio.wait_for(sim.done.wait(), WAIT_S)
    assert sim.started.is_set()
    # The first event continues the snapshot taken before subscribing, and none is missing.
    assert events[0]["U"] == snapshot["lastUpdateId"] + 1
    assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(events))
    book = ReferenceBook(snapshot)
    for event in events:
        book.apply(event)
    assert book.as_snapshot() == sim.markets["btcusdt"].snapshot(5000)
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


async def test_depth_reports_used_weight_of_the_last_minute(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0, weight_interval_s=3600)  # no reset mid-test
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


# -- Binance's rules: streams per connection, URL length ----------------------------------------


async def test_more_streams_than_a_connection_may_carry_are_refused(
    start_sim: StartSimulator,
) -> None:
    symbols = ("btcusdt", "ethusdt", "bnbusdt", "solusdt")
    sim = await start_sim(symbols, rate=0, max_events=1, max_streams_per_connection=3)
    names = [f"{s}@depth@100ms" for s in symbols]
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(sim, "/stream?streams=" + "/".join(names))):
            pass
    response = refused.value.response
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/json")
    error = json.loads(response.body)
    assert error["code"] == -1101
    assert "at most 3" in error["msg"]
    async with connect(ws_url(sim, "/stream?streams=" + "/".join(names[:3]))) as ws:
        seen = {(await recv_data(ws))["s"] for _ in range(3)}
    assert seen == {"BTCUSDT", "ETHUSDT", "BNBUSDT"}


async def test_binance_default_of_1024_streams_per_connection(start_sim: StartSimulator) -> None:
    # Names this short still make a URL of ~17 KB: the URL limit is lifted to reach this one.
    sim = await start_sim((), symbols_count=1025, rate=0, max_events=1, max_url_bytes=None)
    names = [f"{s}@depth" for s in sim.symbols]
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(sim, "/stream?streams=" + "/".join(names))):
            pass
    assert refused.value.response.status_code == 400
    assert "1024" in json.loads(refused.value.response.body)["msg"]
    url = ws_url(sim, "/stream?streams=" + "/".join(names[:1024]))
    async with connect(url, max_size=None) as ws:
        events = [await recv_data(ws) for _ in range(1024)]
    assert len({event["s"] for event in events}) == 1024


async def test_request_url_longer_than_8_kb_answers_414(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0)
    async with rest(sim) as client:
        fits = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "x": "a" * 7000})
        too_long = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "x": "a" * 8200})
    assert fits.status_code == 200
    assert too_long.status_code == 414
    streams = "/".join(["btcusdt@depth@100ms"] * 450)  # ~9 KB
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(sim, "/stream?streams=" + streams)):
            pass
    assert refused.value.response.status_code == 414


# -- request weight: fixed intervals, 429, 418 bans ---------------------------------------------


def test_rate_limiter_counts_per_fixed_interval_per_ip() -> None:
    now = [1_000_000 * 60 + 23.456]  # hh:mm:23.456 counts towards hh:mm:00
    limiter = RateLimiter(100, clock=lambda: now[0])
    assert limiter.admit("10.0.0.1", 50).used == 50
    assert limiter.admit("10.0.0.2", 5).used == 5  # per address
    now[0] += 36.5  # hh:mm:59.956, same interval
    assert limiter.admit("10.0.0.1", 50) == Verdict(HTTPStatus.OK, 100)  # at the limit: served
    now[0] += 0.05  # the next minute: the count resets (a rolling window would not)
    assert limiter.admit("10.0.0.1", 25).used == 25
    assert limiter.used("10.0.0.1") == 25
    assert limiter.used("10.0.0.9") == 0
    assert limiter.stats.peak_weight_1m == 100


def test_rate_limiter_429_then_escalating_418_bans() -> None:
    start = 1_000_000 * 60.0
    now = [start + 50.2]
    limiter = RateLimiter(10, ban_base_s=2.0, clock=lambda: now[0])
    assert limiter.admit("ip", 10).status == HTTPStatus.OK
    limited = limiter.admit("ip", 5)
    assert limited == Verdict(HTTPStatus.TOO_MANY_REQUESTS, 15, 10)  # 9.8 s to the minute's end
    now[0] += 1  # ignoring Retry-After: banned for the base duration
    banned = limiter.admit("ip", 5)
    assert (banned.status, banned.used, banned.retry_after) == (HTTPStatus.IM_A_TEAPOT, 15, 2)
    assert banned.banned_until_ms == int((now[0] + 2) * 1000)
    now[0] += 1.5  # still banned; the ban is not extended by asking
    assert limiter.admit("ip", 5).retry_after == 1
    now[0] += 0.6  # ban over; still over the limit in this minute: a 429 again
    assert limiter.admit("ip", 1).status == HTTPStatus.TOO_MANY_REQUESTS
    second = limiter.admit("ip", 1)  # ignored again: twice as long
    assert (second.status, second.retry_after) == (HTTPStatus.IM_A_TEAPOT, 4)
    now[0] += 4.1
    third_429 = limiter.admit("ip", 1)
    assert third_429.status == HTTPStatus.TOO_MANY_REQUESTS
    now[0] = start + 60 + 0.1  # honoured the Retry-After: a fresh minute, served
    assert limiter.admit("ip", 1) == Verdict(HTTPStatus.OK, 1)
    assert limiter.stats.bans == 2
    assert limiter.stats.max_429_per_interval == 3


def test_rate_limiter_without_limit_only_counts() -> None:
    limiter = RateLimiter(None)
    for _ in range(100):
        verdict = limiter.admit("ip", 250)
    assert verdict == Verdict(HTTPStatus.OK, 25_000)


async def get(sim: Simulator, path: str, **params: Any) -> httpx.Response:
    async with rest(sim) as client:
        return await client.get(path, params=params)


async def test_over_the_weight_limit_429_then_418_with_retry_after(
    start_sim: StartSimulator,
) -> None:
    # An hour-long interval: the count cannot reset in the middle of the test.
    sim = await start_sim(("btcusdt",), rate=0, weight_limit=20, ban_base_s=1.0,
                          weight_interval_s=3600)  # fmt: skip
    used = []
    for _ in range(4):
        response = await depth(sim, symbol="BTCUSDT")
        assert response.status_code == 200
        assert "retry-after" not in response.headers
        used.append(int(response.headers["X-MBX-USED-WEIGHT-1M"]))
    assert used == [5, 10, 15, 20]
    limited = await depth(sim, symbol="BTCUSDT")
    assert limited.status_code == 429
    assert limited.headers["X-MBX-USED-WEIGHT-1M"] == "25"
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600
    assert limited.json()["code"] == -1003
    assert "current limit is 20 request weight per 1 MINUTE" in limited.json()["msg"]
    banned = await get(sim, "/api/v3/exchangeInfo")  # any route: the IP is what is limited
    assert banned.status_code == 418
    assert banned.headers["Retry-After"] == "1"
    assert "IP banned until" in banned.json()["msg"]
    assert (await get(sim, "/api/v3/ping")).status_code == 418
    await asyncio.sleep(1.2)
    again = await depth(sim, symbol="BTCUSDT")  # ban over, the hour still over the limit
    assert again.status_code == 429
    longer = await depth(sim, symbol="BTCUSDT")
    assert longer.status_code == 418
    assert longer.headers["Retry-After"] == "2"  # escalated: twice the base
    stats = sim.rest_stats
    assert (stats.ok, stats.rate_limited, stats.banned, stats.bans) == (4, 2, 3, 2)
    assert stats.peak_weight_1m == 30
    assert stats.max_429_per_interval == 2
    assert stats.requests_by_path["/api/v3/depth"] == 7


async def test_a_client_honouring_retry_after_is_served_in_the_next_interval(
    start_sim: StartSimulator,
) -> None:
    sim = await start_sim(("btcusdt",), rate=0, weight_limit=50, weight_interval_s=1.0)
    async with asyncio.timeout(WAIT_S):
        while (response := await depth(sim, symbol="BTCUSDT", limit=1000)).status_code == 200:
            pass
    assert response.status_code == 429
    retry_after = int(response.headers["Retry-After"])
    assert retry_after == 1  # the (1 s) interval's end, rounded up
    await asyncio.sleep(retry_after)
    served = await depth(sim, symbol="BTCUSDT", limit=1000)
    assert served.status_code == 200
    assert served.headers["X-MBX-USED-WEIGHT-1M"] == "50"
    stats = sim.rest_stats
    assert stats.banned == 0
    assert stats.max_429_per_interval == 1


async def test_weight_of_exchange_info_ping_and_time(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt",), rate=0, weight_interval_s=3600)
    async with rest(sim) as client:
        info = await client.get("/api/v3/exchangeInfo")
        ping = await client.get("/api/v3/ping")
        clock = await client.get("/api/v3/time")
    assert info.headers["X-MBX-USED-WEIGHT-1M"] == "20"
    assert ping.headers["X-MBX-USED-WEIGHT-1M"] == "21"
    assert ping.json() == {}
    assert clock.headers["X-MBX-USED-WEIGHT-1M"] == "22"
    assert abs(clock.json()["serverTime"] - time.time() * 1000) < 60_000


# -- exchangeInfo and listings -----------------------------------------------------------------


async def test_exchange_info_lists_the_served_symbols(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt", "ethusdt", "xrpusdt"), rate=0, break_symbols=["xrpusdt"])
    info = (await get(sim, "/api/v3/exchangeInfo")).json()
    assert info["timezone"] == "UTC"
    assert abs(info["serverTime"] - time.time() * 1000) < 60_000
    weight_limit = info["rateLimits"][0]
    assert weight_limit == {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE",
                            "intervalNum": 1, "limit": 6000}  # fmt: skip
    assert "RAW_REQUESTS" in {limit["rateLimitType"] for limit in info["rateLimits"]}
    by_symbol = {s["symbol"]: s for s in info["symbols"]}
    assert {s: v["status"] for s, v in by_symbol.items()} == {
        "BTCUSDT": "TRADING", "ETHUSDT": "TRADING", "XRPUSDT": "BREAK"
    }  # fmt: skip
    btc = by_symbol["BTCUSDT"]
    assert (btc["baseAsset"], btc["quoteAsset"]) == ("BTC", "USDT")
    price_filter = next(f for f in btc["filters"] if f["filterType"] == "PRICE_FILTER")
    assert price_filter["tickSize"] == "0.01000000"
    one = (await get(sim, "/api/v3/exchangeInfo", symbol="ETHUSDT")).json()
    assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
    two = (await get(sim, "/api/v3/exchangeInfo", symbols='["BTCUSDT","XRPUSDT"]')).json()
    assert [s["symbol"] for s in two["symbols"]] == ["BTCUSDT", "XRPUSDT"]
    unknown = await get(sim, "/api/v3/exchangeInfo", symbol="DOGEUSDT")
    assert (unknown.status_code, unknown.json()["code"]) == (400, -1121)


async def test_listings_change_at_run_time(start_sim: StartSimulator) -> None:
    sim = await start_sim(("btcusdt", "ethusdt"), rate=200, break_symbols=["ethusdt"])

    async def statuses() -> dict[str, str]:
        body = (await get(sim, "/api/v3/exchangeInfo")).json()
        return {s["symbol"]: s["status"] for s in body["symbols"]}

    url = ws_url(sim, "/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms/dogeusdt@depth")
    with pytest.raises(InvalidStatus):  # not listed yet
        async with connect(url):
            pass
    sim.list_symbol("DOGEUSDT")
    assert await statuses() == {"BTCUSDT": "TRADING", "ETHUSDT": "BREAK", "DOGEUSDT": "TRADING"}
    async with connect(url) as ws:
        # A symbol in BREAK gets no events; listed and trading ones do.
        first = {(await recv_data(ws))["s"] for _ in range(40)}
        assert first == {"BTCUSDT", "DOGEUSDT"}
        sim.set_symbol_status("ethusdt", "TRADING")
        sim.delist_symbol("dogeusdt")
        later = [(await recv_data(ws))["s"] for _ in range(60)]
    assert "ETHUSDT" in later
    assert "DOGEUSDT" not in later[-20:]  # a few were on the way when it was delisted
    assert await statuses() == {"BTCUSDT": "TRADING", "ETHUSDT": "TRADING"}
    gone = await depth(sim, symbol="DOGEUSDT")
    assert (gone.status_code, gone.json()["code"]) == (400, -1121)
    assert sim.listings == {"btcusdt": "TRADING", "ethusdt": "TRADING"}


# -- whole-market activity ----------------------------------------------------------------------


def test_generated_symbols_and_skewed_rates() -> None:
    names = generated_symbols(3, taken=["s0002usdt"])
    assert names == ["s0001usdt", "s0003usdt", "s0004usdt"]
    rates = symbol_rates(1500, 3000.0)
    assert sum(rates) == pytest.approx(3000.0)
    assert max(rates) == pytest.approx(10.0)  # @depth@100ms: one event per 100 ms at most
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] < 1.0  # a long quiet tail
    assert rates[0] > 10 * rates[-1]
    assert symbol_rates(3, 100.0) == [10.0, 10.0, 10.0]  # cannot exceed the cap


def test_shaped_events_look_like_the_recordings() -> None:
    market = ShapedMarket("btcusdt", seed=3)
    events = [market.next_event(0) for _ in range(3000)]
    levels = [len(e["b"]) + len(e["a"]) for e in events]
    spans = [e["u"] - e["U"] + 1 for e in events]
    # The recordings: levels median ~20, mean ~45; U..u median ~25.
    assert 15 <= statistics.median(levels) <= 30
    assert 35 <= statistics.mean(levels) <= 60
    assert max(levels) > 300
    assert 15 <= statistics.median(spans) <= 40
    assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(events))
    book = ReferenceBook(dict(ShapedMarket("btcusdt", seed=3).snapshot(5000)))  # type: ignore[arg-type]
    for event in events:
        book.apply(event)
    assert book.as_snapshot() == market.snapshot(5000)
    top = market.snapshot(1)
    assert float(top["bids"][0][0]) < float(top["asks"][0][0])


async def test_many_symbols_at_a_total_rate_with_consistent_snapshots(
    start_sim: StartSimulator,
) -> None:
    sim = await start_sim(("btcusdt",), symbols_count=300, total_rate=600.0, seed=2, max_events=25)
    assert len(sim.symbols) == 300
    assert list(sim.markets)[:2] == ["btcusdt", "s0001usdt"]
    assert sum(sim.symbol_rates.values()) == pytest.approx(600.0)
    assert sim.symbol_rates["btcusdt"] == pytest.approx(10.0)  # first given = busiest
    quiet = min(sim.symbol_rates, key=sim.symbol_rates.__getitem__)
    market = sim.markets["btcusdt"]
    assert isinstance(market, ShapedMarket)
    streams = "/".join(f"{s}@depth@100ms" for s in list(sim.markets)[:200])
    events: list[dict[str, Any]] = []
    async with connect(ws_url(sim, "/stream?streams=" + streams)) as ws:
        events.append(await recv_data(ws))
        snapshot = (await depth(sim, symbol="BTCUSDT", limit=5000)).json()
        # Until btcusdt's last event (its 25th) arrived; the market then stops moving.
        while not (events[-1]["s"] == "BTCUSDT" and events[-1]["u"] == market.last_update_id
                   and sim.events_generated["btcusdt"] == 25):  # fmt: skip
            events.append(await recv_data(ws))
    btc = [e for e in events if e["s"] == "BTCUSDT"]
    assert len({e["s"] for e in events}) > 30  # the activity is spread over many symbols...
    assert len(btc) > len(events) / 200  # ...but the busiest get more than an even share
    pending = [e for e in btc if e["u"] > snapshot["lastUpdateId"]]
    assert pending
    assert pending[0]["U"] <= snapshot["lastUpdateId"] + 1 <= pending[0]["u"]
    book = ReferenceBook(snapshot)
    for event in pending:
        book.apply(event)
    assert book.as_snapshot() == market.snapshot(5000)
    assert sim.events_generated[quiet] < sim.events_generated["btcusdt"]
    assert market.true_wap == {}  # no WAP history kept for a whole market


async def test_scheduled_market_with_max_events_finishes(start_sim: StartSimulator) -> None:
    sim = await start_sim((), symbols_count=20, total_rate=200.0, max_events=3)
    async with connect(ws_url(sim, "/stream?streams=" + "/".join(
        f"{s}@depth" for s in sim.symbols
    ))) as ws:  # fmt: skip
        events = [await recv_data(ws) for _ in range(60)]
        await asyncio.wait_for(sim.done.wait(), WAIT_S)
    assert sim.events_generated == dict.fromkeys(sim.symbols, 3)
    assert len(events) == 60


def test_cli_flags_reach_the_simulator() -> None:
    from depthflow.cli import _parser

    args = _parser().parse_args(
        ["simulate", "--symbols-count", "1500", "--total-rate", "3000", "--weight-limit", "0",
         "--ban-base-s", "2", "--max-streams-per-connection", "200", "--break-symbols", "a,b"]
    )  # fmt: skip
    assert (args.symbols_count, args.total_rate, args.weight_limit) == (1500, 3000.0, 0)
    assert (args.ban_base_s, args.max_streams_per_connection) == (2.0, 200)
    assert args.break_symbols == "a,b"
