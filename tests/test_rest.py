"""RestScheduler against a real HTTP server on loopback that counts weight like Binance.

The server (`FakeBinance`) speaks minimal HTTP/1.1 (keep-alive) through `asyncio.start_server`;
httpx is not mocked. Its "minute" is a fixed window of ``WINDOW_S`` wall-clock seconds, the same
as the scheduler's, so several windows fit in one test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from depthflow.accounting import SnapshotReason
from depthflow.metrics import Metrics
from depthflow.rest import (
    DEFAULT_BAN_S,
    MAX_PAUSE_S,
    MIN_PAUSE_S,
    Pause,
    RestError,
    RestErrorKind,
    RestScheduler,
    WeightBudget,
    depth_weight,
    parse_retry_after,
    parse_used_weight,
)

WINDOW_S = 2.0  # the fake "minute"
MARGIN_S = 0.4  # requests dispatched this close to a boundary count in both windows
GRACE_S = 0.5  # a request this long after a 429 was surely sent after the client saw it
DEADLINE_S = 60.0  # generous bound on any whole test step (a loaded 2-core machine)

SYNC = SnapshotReason.SYNC
RESYNC = SnapshotReason.RESYNC
AUDIT = SnapshotReason.AUDIT


# -- the fake exchange -------------------------------------------------------------------------


@dataclass
class Hit:
    index: int  # 1-based arrival order
    at: float  # time.monotonic() at arrival
    window: int
    path: str
    symbol: str | None
    weight: int
    status: int = 0


def binance_depth_weight(limit: int) -> int:
    # Written again here, from Binance's table, rather than imported from the code under test.
    for bound, weight in ((100, 5), (500, 25), (1000, 50)):
        if limit <= bound:
            return weight
    return 250


class FakeBinance:
    """Counts request weight per fixed window like Binance and misbehaves on demand."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.base_url = ""
        self.limit: int | None = None  # the IP limit: 429 once a window's use passes it
        self.outside = 0  # weight another client on the IP uses at the start of every window
        self.throttle_requests: set[int] = set()  # arrival indexes answered 429
        self.ban_requests: set[int] = set()  # arrival indexes answered 418
        self.retry_after = 1
        self.delay_s = 0.0
        self.trickle: set[str] = set()  # symbols whose body comes one byte at a time
        self.hold: asyncio.Event | None = None  # responses wait for it when set
        self.hits: list[Hit] = []
        self.used: Counter[int] = Counter()  # the IP's use per window (ours + outside)
        self.ours: Counter[int] = Counter()
        self._throttle_started = -math.inf
        self._throttle_until = -math.inf
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self._server.wait_closed()

    def statuses(self) -> Counter[int]:
        return Counter(hit.status for hit in self.hits)

    def symbols(self) -> list[str | None]:
        return [hit.symbol for hit in self.hits]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b"\r\n", 1)[0].decode().split(" ")[1]
                if not await self._respond(target, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, target: str, writer: asyncio.StreamWriter) -> bool:
        url = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(url.query)
        symbol = query["symbol"][0] if "symbol" in query else None
        if url.path == "/api/v3/depth":
            weight = binance_depth_weight(int(query.get("limit", ["100"])[0]))
        elif url.path == "/api/v3/exchangeInfo":
            weight = 20
        else:
            weight = 1
        now = time.monotonic()
        wall = time.time()
        window = math.floor(wall / self.window_s)
        if window not in self.used:
            self.used[window] = self.outside
        self.used[window] += weight
        self.ours[window] += weight
        hit = Hit(len(self.hits) + 1, now, window, url.path, symbol, weight)
        self.hits.append(hit)

        retry_after: int | None = None
        if now < self._throttle_until:
            # Still throttled. A request long after the 429 ignored it: Binance would ban.
            if now >= self._throttle_started + GRACE_S:
                hit.status, retry_after = 418, self.retry_after
            else:
                hit.status = 429
                retry_after = max(1, math.ceil(self._throttle_until - now))
        elif hit.index in self.ban_requests:
            hit.status, retry_after = 418, self.retry_after
        elif hit.index in self.throttle_requests:
            hit.status, retry_after = 429, self.retry_after
            self._throttle_started = now
            self._throttle_until = now + self.retry_after
        elif self.limit is not None and self.used[window] > self.limit:
            hit.status = 429
            retry_after = max(1, math.ceil((window + 1) * self.window_s - wall))
        elif url.path == "/api/v3/depth" and symbol is None:
            hit.status = 400
        else:
            hit.status = 200

        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hold is not None:
            await self.hold.wait()
        body = json.dumps(
            {"lastUpdateId": hit.index, "symbol": symbol, "bids": [["1.0", "2.0"]], "asks": []}
        ).encode()
        reason = {200: "OK", 400: "Bad Request", 418: "I'm a teapot", 429: "Too Many Requests"}
        lines = [
            f"HTTP/1.1 {hit.status} {reason[hit.status]}",
            "Content-Type: application/json",
            f"X-MBX-USED-WEIGHT-1M: {self.used[window]}",
        ]
        if retry_after is not None:
            lines.append(f"Retry-After: {retry_after}")
        if symbol in self.trickle:
            lines.append("Content-Length: 100000")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            for _ in range(300):  # at most a minute, one byte every 0.2 s
                if writer.transport.is_closing():
                    break
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.2)
            return False
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return True


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    server = FakeBinance()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=30.0) as http:
        yield http


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def make(
    fake: FakeBinance, client: httpx.AsyncClient, metrics: Metrics
) -> Callable[..., RestScheduler]:
    def build(**overrides: Any) -> RestScheduler:
        options: dict[str, Any] = {
            "weight_per_minute": 6000,
            "max_concurrency": 4,
            "request_timeout_s": 20.0,
            "window_s": WINDOW_S,
            "boundary_margin_s": MARGIN_S,
        }
        options.update(overrides)
        return RestScheduler(client, fake.base_url, metrics, **options)

    return build


@contextlib.asynccontextmanager
async def running(scheduler: RestScheduler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def snapshot_of(body: str) -> dict[str, Any]:
    decoded = json.loads(body)
    assert isinstance(decoded, dict)
    return decoded


# -- pure policy ---------------------------------------------------------------------------------


def test_depth_weight_follows_binance_table() -> None:
    cases = {1: 5, 5: 5, 100: 5, 101: 25, 500: 25, 501: 50, 1000: 50, 1001: 250, 5000: 250}
    for limit, weight in cases.items():
        assert depth_weight(limit) == weight == binance_depth_weight(limit)
    assert depth_weight(10_000) == 250  # Binance returns 5,000 levels for a larger limit
    with pytest.raises(ValueError, match="limit"):
        depth_weight(0)


def test_parse_retry_after() -> None:
    assert parse_retry_after("7", 60.0) == 7.0
    assert parse_retry_after(" 2.5 ", 60.0) == 2.5
    assert parse_retry_after(None, 60.0) == 60.0
    assert parse_retry_after("soon", 60.0) == 60.0
    assert parse_retry_after("nan", 60.0) == 60.0
    assert parse_retry_after("0", 60.0) == MIN_PAUSE_S
    assert parse_retry_after("99999999", 60.0) == MAX_PAUSE_S
    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # 1445412480
    assert parse_retry_after(date, 60.0, now_wall=1445412480 - 30) == 30.0
    assert parse_used_weight("123") == 123
    assert parse_used_weight(None) is None
    assert parse_used_weight("x") is None
    assert parse_used_weight("-1") is None


def test_budget_resets_at_the_window_boundary() -> None:
    budget = WeightBudget(100, window_s=60.0, margin_s=1.0)
    t = 600.0  # the start of window 10
    assert budget.delay(5, 100, t) == 0.0
    for _ in range(20):
        budget.charge(5, t + 1)
    assert budget.used(t + 2) == 100
    wait = budget.delay(5, 100, t + 2)
    assert 58.0 <= wait <= 58.1  # until 660
    assert budget.used(t + 60) == 0
    assert budget.delay(5, 100, t + 60) == 0.0


def test_budget_charges_both_windows_near_the_boundary() -> None:
    budget = WeightBudget(100, window_s=60.0, margin_s=1.0)
    charge = budget.charge(50, 659.5)  # within a second of 660
    assert charge.windows == (10, 11)
    assert budget.used(659.9) == 50
    assert budget.used(660.0) == 50
    # 60 more cannot go near the boundary (window 11 would pass 100), nor early in window 11.
    assert budget.delay(60, 100, 659.6) > 0
    assert budget.delay(60, 100, 661.0) > 0
    assert budget.delay(50, 100, 661.0) == 0.0


def test_budget_trusts_a_higher_header_and_remembers_requests_in_flight() -> None:
    budget = WeightBudget(300, window_s=60.0, margin_s=1.0)
    first = budget.charge(5, 601.0)
    second = budget.charge(5, 601.0)  # in flight when the first answers
    budget.settle(first, 205, 601.1, throttled=False)  # another client used 200
    assert budget.used(601.2) == 210  # 200 outside + our 10, the second not yet answered
    # The second was sent while the first was in flight: its header may not count the first,
    # so the outside use it shows is taken as 205 (conservative by the first's weight).
    budget.settle(second, 210, 601.2, throttled=False)
    assert budget.used(601.3) == 215
    # Sent once both had answered, the third's header pins the outside use again: the largest
    # seen stays. A header lower than our own count never lowers the estimate.
    third = budget.charge(5, 601.4)
    budget.settle(third, 3, 601.5, throttled=False)
    assert budget.used(601.6) == 220


def test_budget_drops_a_header_of_an_earlier_window() -> None:
    budget = WeightBudget(300, window_s=60.0, margin_s=1.0)
    late = budget.charge(5, 650.0)  # sent in window 10, answered in window 11
    budget.settle(late, 290, 661.0, throttled=False)
    assert budget.used(661.0) == 0


def test_budget_is_full_after_a_429() -> None:
    budget = WeightBudget(300, window_s=60.0, margin_s=1.0)
    charge = budget.charge(5, 601.0)
    budget.settle(charge, None, 601.1, throttled=True)
    assert budget.used(601.2) == 300
    assert budget.delay(5, 300, 601.2) > 0
    assert budget.delay(5, 300, 660.0) == 0.0


def test_budget_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="limit"):
        WeightBudget(0)
    with pytest.raises(ValueError, match="margin"):
        WeightBudget(10, window_s=2.0, margin_s=1.0)


def test_pause_counts_only_the_seconds_it_adds() -> None:
    pause = Pause()
    assert pause.remaining(100.0) == 0.0
    assert pause.extend(10.0, 100.0) == 10.0
    assert pause.remaining(104.0) == 6.0
    assert pause.extend(3.0, 104.0) == 0.0  # already paused longer
    assert pause.extend(10.0, 105.0) == pytest.approx(5.0)  # until 115 instead of 110
    assert pause.remaining(115.0) == 0.0


# -- the scheduler against the fake exchange ------------------------------------------------------


async def test_budget_holds_in_every_window_and_every_snapshot_completes(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    fake.limit = 300  # the server throttles like Binance if we ever pass it
    scheduler = make(weight_per_minute=300, max_concurrency=8)
    async with running(scheduler):
        calls = [scheduler.depth(f"SYM{i}", 100, RESYNC) for i in range(200)]
        async with asyncio.timeout(DEADLINE_S):
            bodies = await asyncio.gather(*calls)

    assert [snapshot_of(b)["symbol"] for b in bodies] == [f"SYM{i}" for i in range(200)]
    assert len(fake.hits) == 200
    assert fake.statuses() == {200: 200}
    assert max(fake.ours.values()) <= 300
    assert len(fake.ours) >= 4  # 1,000 weight at 300 a window
    assert metrics.rest_weight_used == 1000
    assert metrics.rest_requests[("depth", "200")] == 200
    assert metrics.snapshots == {"resync": 200}
    assert scheduler.queue_length == 0
    assert scheduler.in_flight == 0


async def test_429_pauses_every_request_for_retry_after(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    fake.throttle_requests = {5}
    fake.retry_after = 1
    scheduler = make(max_concurrency=3)
    fake.delay_s = 0.02
    async with running(scheduler):
        calls = [scheduler.depth(f"SYM{i}", 100, SYNC) for i in range(20)]
        async with asyncio.timeout(DEADLINE_S):
            bodies = await asyncio.gather(*calls)

    assert len(bodies) == 20
    statuses = fake.statuses()
    assert statuses[418] == 0
    assert statuses[200] == 20
    throttled = [hit for hit in fake.hits if hit.status == 429]
    assert throttled
    first = throttled[0].at
    # Only requests already on their way arrive shortly after the 429; then nothing for 1 s.
    assert not [hit for hit in fake.hits if first + GRACE_S <= hit.at < first + 1.0]
    after = [hit for hit in fake.hits if hit.at > first and hit.status == 200]
    assert min(hit.at for hit in after) >= first + 1.0
    # The throttled request was sent again.
    assert Counter(fake.symbols())[throttled[0].symbol] == 2
    assert metrics.rest_throttled_seconds >= 1.0
    assert metrics.rest_banned_seconds == 0.0
    assert metrics.rest_requests[("depth", "429")] == len(throttled)


async def test_418_pauses_for_its_retry_after_and_the_request_is_retried(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    fake.ban_requests = {1}
    fake.retry_after = 1
    scheduler = make(max_concurrency=1)
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            body = await scheduler.depth("BNBUSDT", 100, SYNC)
    assert snapshot_of(body)["symbol"] == "BNBUSDT"
    assert [hit.status for hit in fake.hits] == [418, 200]
    assert fake.hits[1].at - fake.hits[0].at >= 1.0
    assert metrics.rest_banned_seconds >= 1.0
    assert DEFAULT_BAN_S >= 120.0  # Binance's shortest ban, used when Retry-After is missing


async def test_sync_queued_after_audits_is_sent_first(
    fake: FakeBinance, make: Callable[..., RestScheduler]
) -> None:
    scheduler = make(max_concurrency=1)
    plan = [("A0", AUDIT), ("A1", AUDIT), ("R0", RESYNC), ("A2", AUDIT)]
    plan += [("S0", SYNC), ("R1", RESYNC), ("S1", SYNC)]
    tasks = [asyncio.create_task(scheduler.depth(sym, 100, reason)) for sym, reason in plan]
    await until(lambda: scheduler.queue_length == len(plan))
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*tasks)
    assert fake.symbols() == ["S0", "S1", "R0", "R1", "A0", "A1", "A2"]


async def test_a_sync_joining_a_queued_audit_moves_it_up(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    scheduler = make(max_concurrency=1)
    audit = asyncio.create_task(scheduler.depth("ETHUSDT", 100, AUDIT))
    resync = asyncio.create_task(scheduler.depth("BTCUSDT", 100, RESYNC))
    await until(lambda: scheduler.queue_length == 2)
    sync = asyncio.create_task(scheduler.depth("ETHUSDT", 100, SYNC))
    await asyncio.sleep(0)
    assert scheduler.queue_length == 2
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            results = await asyncio.gather(audit, resync, sync)
    assert fake.symbols() == ["ETHUSDT", "BTCUSDT"]
    assert results[0] == results[2]
    assert metrics.snapshots == {"sync": 1, "resync": 1}


async def test_audits_only_with_budget_to_spare(
    fake: FakeBinance, make: Callable[..., RestScheduler]
) -> None:
    scheduler = make(weight_per_minute=100, max_concurrency=4)  # audits: 50 a window
    async with running(scheduler):
        calls = [scheduler.depth(f"SYM{i}", 100, AUDIT) for i in range(16)]
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*calls)
    assert len(fake.hits) == 16
    assert max(fake.ours.values()) <= 50
    with pytest.raises(RestError) as caught:
        await scheduler.depth("BTCUSDT", 5000, AUDIT)  # 250 can never fit the audit share
    assert caught.value.kind is RestErrorKind.TOO_HEAVY


async def test_two_calls_for_one_symbol_send_one_request(
    fake: FakeBinance, make: Callable[..., RestScheduler]
) -> None:
    scheduler = make()
    async with running(scheduler):
        # Both queued at once.
        async with asyncio.timeout(DEADLINE_S):
            first, second = await asyncio.gather(
                scheduler.depth("BTCUSDT", 100, SYNC), scheduler.depth("BTCUSDT", 100, RESYNC)
            )
        assert first == second
        assert fake.symbols() == ["BTCUSDT"]

        # The second while the first is in flight.
        fake.hold = asyncio.Event()
        early = asyncio.create_task(scheduler.depth("ETHUSDT", 100, SYNC))
        await until(lambda: len(fake.hits) == 2)
        late = asyncio.create_task(scheduler.depth("ETHUSDT", 100, SYNC))
        with pytest.raises(RestError) as caught:
            await scheduler.depth("ETHUSDT", 500, SYNC)
        assert caught.value.kind is RestErrorKind.CONFLICT
        fake.hold.set()
        async with asyncio.timeout(DEADLINE_S):
            assert await early == await late
        assert fake.symbols() == ["BTCUSDT", "ETHUSDT"]


async def test_a_request_whose_callers_all_left_is_dropped(
    fake: FakeBinance, make: Callable[..., RestScheduler]
) -> None:
    scheduler = make()
    caller = asyncio.create_task(scheduler.depth("BTCUSDT", 100, SYNC))
    await until(lambda: scheduler.queue_length == 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert scheduler.queue_length == 0
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            await scheduler.depth("ETHUSDT", 100, SYNC)
    assert fake.symbols() == ["ETHUSDT"]


async def test_a_trickling_body_hits_the_deadline_and_the_next_request_goes_out(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    fake.trickle = {"SLOWUSDT"}
    scheduler = make(max_concurrency=1, request_timeout_s=1.0)
    async with running(scheduler):
        started = time.monotonic()
        with pytest.raises(RestError) as caught:
            async with asyncio.timeout(DEADLINE_S):
                await scheduler.depth("SLOWUSDT", 100, SYNC)
        assert caught.value.kind is RestErrorKind.TIMEOUT
        assert 0.9 <= time.monotonic() - started < 20.0
        async with asyncio.timeout(DEADLINE_S):
            body = await scheduler.depth("FASTUSDT", 100, SYNC)
    assert snapshot_of(body)["symbol"] == "FASTUSDT"
    assert metrics.rest_requests[("depth", "timeout")] == 1
    assert metrics.rest_requests[("depth", "200")] == 1


async def test_a_higher_header_is_respected(
    fake: FakeBinance, make: Callable[..., RestScheduler]
) -> None:
    fake.limit = 300
    fake.outside = 200  # another client on the IP: only 100 left per window
    scheduler = make(weight_per_minute=300, max_concurrency=4)
    seen: list[int] = []

    async def sample() -> None:
        while True:
            seen.append(scheduler.used_weight)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    async with running(scheduler):
        calls = [scheduler.depth(f"SYM{i}", 100, SYNC) for i in range(40)]
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*calls)
    sampler.cancel()
    assert fake.statuses() == {200: 40}
    assert max(fake.used.values()) <= 300
    assert max(fake.ours.values()) <= 100
    assert len(fake.ours) >= 2  # 200 weight at 100 a window
    assert max(seen) > 200  # the estimate learned the outside use


async def test_exchange_info_is_joined_and_weighs_20(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    scheduler = make()
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            info, again = await asyncio.gather(scheduler.exchange_info(), scheduler.exchange_info())
        assert info == again
        assert fake.hits[0].path == "/api/v3/exchangeInfo"
        assert len(fake.hits) == 1
    assert metrics.rest_weight_used == 20
    assert metrics.rest_requests[("exchangeInfo", "200")] == 1
    assert metrics.snapshots == {}


async def test_connection_refused_is_a_transport_error(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    scheduler = RestScheduler(
        client,
        f"http://127.0.0.1:{port}",
        metrics,
        weight_per_minute=6000,
        max_concurrency=2,
        request_timeout_s=10.0,
    )
    async with running(scheduler):
        with pytest.raises(RestError) as caught:
            async with asyncio.timeout(DEADLINE_S):
                await scheduler.depth("BTCUSDT", 100, SYNC)
    assert caught.value.kind is RestErrorKind.TRANSPORT
    assert metrics.rest_requests[("depth", "transport")] == 1


async def test_an_unresolvable_host_names_the_url_and_the_way_offline(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    scheduler = RestScheduler(
        client,
        "https://no-such-host.invalid",
        metrics,
        weight_per_minute=6000,
        max_concurrency=2,
        request_timeout_s=30.0,
    )
    async with running(scheduler):
        with pytest.raises(RestError) as caught:
            async with asyncio.timeout(DEADLINE_S):
                await scheduler.depth("BTCUSDT", 100, SYNC)
    assert caught.value.kind is RestErrorKind.TRANSPORT
    message = str(caught.value)
    assert "https://no-such-host.invalid/api/v3/depth" in message
    assert "host no-such-host.invalid does not resolve" in message
    assert "depthflow simulate" in message
    assert "BINANCE_REST_URL=http://127.0.0.1:8765" in message


async def test_run_is_restartable_and_requeues_what_was_in_flight(
    fake: FakeBinance, make: Callable[..., RestScheduler]
) -> None:
    scheduler = make()
    fake.hold = asyncio.Event()
    caller = asyncio.create_task(scheduler.depth("BTCUSDT", 100, SYNC))
    async with running(scheduler):
        await until(lambda: len(fake.hits) == 1)
        assert scheduler.in_flight == 1
        with pytest.raises(RuntimeError, match="already running"):
            await scheduler.run()
    assert scheduler.in_flight == 0
    assert scheduler.queue_length == 1
    assert not caller.done()
    fake.hold = None
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            body = await caller
    assert snapshot_of(body)["symbol"] == "BTCUSDT"
    assert len(fake.hits) == 2


async def test_the_dispatcher_survives_an_error(
    fake: FakeBinance, client: httpx.AsyncClient, metrics: Metrics
) -> None:
    calls = 0

    def flaky_wall() -> float:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("clock broke")
        return time.time()

    scheduler = RestScheduler(
        client,
        fake.base_url,
        metrics,
        weight_per_minute=6000,
        max_concurrency=2,
        request_timeout_s=10.0,
        wall_clock=flaky_wall,
        window_s=WINDOW_S,
        boundary_margin_s=MARGIN_S,
    )
    caller = asyncio.create_task(scheduler.depth("BTCUSDT", 100, SYNC))
    await until(lambda: scheduler.queue_length == 1)
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            await caller
    assert metrics.errors["internal"] == 1
    assert len(fake.hits) == 1


async def test_prometheus_exposes_the_rest_counters_and_gauges(
    fake: FakeBinance, make: Callable[..., RestScheduler], metrics: Metrics
) -> None:
    scheduler = make()
    metrics.register_gauge("depthflow_rest_queue", "Queued.", lambda: scheduler.queue_length)
    metrics.register_gauge("depthflow_rest_used_weight", "Used.", lambda: scheduler.used_weight)
    async with running(scheduler):
        async with asyncio.timeout(DEADLINE_S):
            await scheduler.depth("BTCUSDT", 100, SYNC)
    metrics.add_rest_throttled(2.0)
    metrics.add_rest_banned(3.0)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render_prometheus().decode())
        for sample in family.samples
    }
    assert samples[("depthflow_rest_weight_used_total", ())] == 5
    key = ("depthflow_rest_requests_total", (("endpoint", "depth"), ("status", "200")))
    assert samples[key] == 1
    assert samples[("depthflow_snapshots_total", (("reason", "sync"),))] == 1
    assert samples[("depthflow_rest_throttled_seconds_total", ())] == 2.0
    assert samples[("depthflow_rest_banned_seconds_total", ())] == 3.0
    assert samples[("depthflow_rest_queue", ())] == 0
    assert samples[("depthflow_rest_used_weight", ())] >= 0
