"""RedisSink against the real Redis: shared sums, delta pushes, Redis going away and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from depthflow.metrics import Metrics
from depthflow.redis_sink import COUNTERS_KEY, PUSH_ID_TTL_S, STARTED_AT, RedisSink, create_client
from tests.integration.private_services import PrivateRedis
from tests.tcp_proxy import TcpProxy

INTERVAL = 0.02


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    made = create_client(redis_url)
    assert made is not None
    yield made
    await made.aclose()


async def _raw(client: aioredis.Redis, prefix: str) -> dict[str, float]:
    """The counters of the shared hash (without `started_at`, which is no counter)."""
    raw = await client.hgetall(prefix + COUNTERS_KEY)
    return {_text(key): float(value) for key, value in raw.items() if _text(key) != STARTED_AT}


async def _started_at(client: aioredis.Redis, prefix: str) -> float | None:
    value = await client.hget(prefix + COUNTERS_KEY, STARTED_AT)
    return None if value is None else float(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nonzero(totals: dict[str, float]) -> dict[str, float]:
    # Fields that never moved are never pushed, so the hash does not have them.
    return {key: value for key, value in totals.items() if value}


def _bump(metrics: Metrics, scale: int) -> None:
    metrics.count_messages(3 * scale)
    metrics.count_ticks(2 * scale)
    metrics.count_error("decode", scale)
    metrics.count_loss("gap", scale)
    metrics.count_signal("open")
    metrics.observe_latency(0.25 * scale)


async def test_two_processes_sum_into_the_same_totals(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    m1, m2 = Metrics(), Metrics()
    s1 = RedisSink(client, m1, prefix=redis_prefix, flush_interval=INTERVAL)
    s2 = RedisSink(client, m2, prefix=redis_prefix, flush_interval=INTERVAL)
    _bump(m1, 1)
    _bump(m2, 2)
    assert await s1.push()
    assert await s2.push()
    # Not pushed yet: still part of this process's view of the totals.
    m1.count_messages(100)

    seen_by_1 = await s1.totals()
    seen_by_2 = await s2.totals()

    assert seen_by_1["message_count"] == 9 + 100
    assert seen_by_2["message_count"] == 9
    assert seen_by_2["tick_count"] == 6
    assert seen_by_2["error_count"] == 3
    assert seen_by_2["error:decode"] == 3
    assert seen_by_2["data_loss:gap"] == 3
    assert seen_by_2["signal:open"] == 2
    assert seen_by_2["latency_sum"] == pytest.approx(0.75)
    assert seen_by_2["latency_count"] == 2
    assert s1.healthy
    assert s2.healthy


async def test_pushes_are_deltas(client: aioredis.Redis, redis_prefix: str) -> None:
    metrics = Metrics()
    sink = RedisSink(client, metrics, prefix=redis_prefix, flush_interval=INTERVAL)
    _bump(metrics, 1)
    assert await sink.push()
    assert await sink.push()
    metrics.count_messages(5)
    metrics.observe_latency(0.125)
    assert await sink.push()
    assert await sink.push()

    raw = await _raw(client, redis_prefix)

    assert raw == pytest.approx(_nonzero(metrics.local_totals()))
    assert raw["message_count"] == 8
    assert raw["latency_sum"] == pytest.approx(0.375)


async def test_run_flushes_until_stop_and_stop_pushes_the_rest(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    metrics = Metrics()
    sink = RedisSink(client, metrics, prefix=redis_prefix, flush_interval=INTERVAL)
    task = asyncio.create_task(sink.run())
    for _ in range(5):
        metrics.count_messages(2)
        await asyncio.sleep(INTERVAL)
    metrics.count_loss("overflow", 7)

    await sink.stop()
    await asyncio.wait_for(task, 5)

    raw = await _raw(client, redis_prefix)
    assert raw["message_count"] == 10
    assert raw["data_loss:overflow"] == 7
    assert sink.healthy


async def test_without_redis_counters_stay_local() -> None:
    metrics = Metrics()
    sink = RedisSink(None, metrics, prefix="unused:", flush_interval=INTERVAL)
    metrics.count_messages(4)

    assert not sink.enabled
    assert not sink.healthy
    assert not await sink.push()
    assert not await sink.ping()
    assert await sink.totals() == metrics.local_totals()
    task = asyncio.create_task(sink.run())
    await sink.stop()
    await asyncio.wait_for(task, 5)
    assert metrics.errors["redis"] == 0


async def test_create_client_without_url_is_none() -> None:
    assert create_client("") is None


async def test_redis_away_then_back_adds_the_deltas_once(
    client: aioredis.Redis, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="depthflow.redis_sink")
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    port = await proxy.start()
    flaky = create_client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    assert flaky is not None
    metrics = Metrics()
    sink = RedisSink(flaky, metrics, prefix=redis_prefix, flush_interval=INTERVAL)
    try:
        _bump(metrics, 1)
        assert await sink.push()
        assert sink.healthy

        await proxy.cut()
        # Down: every attempt fails, the deltas pile up locally.
        metrics.count_messages(4)
        assert not await sink.push()
        assert not sink.healthy
        metrics.count_loss("gap", 2)
        assert not await sink.push()
        assert not await sink.ping()
        assert metrics.errors["redis"] == 3
        assert await sink.totals() == metrics.local_totals()
        assert metrics.errors["redis"] == 4
        assert (await _raw(client, redis_prefix))["message_count"] == 3

        await proxy.restore()
        metrics.count_messages(1)
        assert await sink.push()
        assert sink.healthy
        assert await sink.push()
    finally:
        await flaky.aclose()
        await proxy.stop()

    raw = await _raw(client, redis_prefix)
    assert raw == pytest.approx(_nonzero(metrics.local_totals()))
    assert raw["message_count"] == 3 + 4 + 1
    assert raw["data_loss:gap"] == 1 + 2
    assert raw["error:redis"] == 4
    assert raw["latency_count"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "depthflow.redis_sink"]
    assert messages == ["redis_unavailable", "redis_restored"]


async def test_stop_while_redis_is_away_still_ends_run(redis_url: str, redis_prefix: str) -> None:
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    port = await proxy.start()
    flaky = create_client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    assert flaky is not None
    metrics = Metrics()
    sink = RedisSink(flaky, metrics, prefix=redis_prefix, flush_interval=INTERVAL)
    try:
        await proxy.cut()
        task = asyncio.create_task(sink.run())
        metrics.count_messages(2)
        await sink.stop()
        # The final push fails, yet run() still ends: the deltas are lost with the process.
        await asyncio.wait_for(task, 5)
        assert not sink.healthy
        assert metrics.errors["redis"] >= 1
    finally:
        await flaky.aclose()
        await proxy.stop()


@pytest.fixture
async def private_client(private_redis: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's own Redis, the only one a test may freeze."""
    made = aioredis.from_url(private_redis.url, socket_timeout=30)
    yield made
    await made.aclose()


@contextlib.asynccontextmanager
async def _frozen(server: PrivateRedis) -> AsyncIterator[None]:
    """SIGSTOP the test's own redis-server (never the shared one) for the block, then SIGCONT and
    wait until it answers again. Meanwhile the kernel keeps accepting what clients send, and the
    server runs it on waking: the case of a reply lost to a client timeout."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)
    probe = aioredis.from_url(server.url, socket_timeout=5)
    try:
        assert await probe.ping()
    finally:
        await probe.aclose()


async def test_a_push_whose_reply_is_lost_is_retried_and_counted_once(
    private_redis: PrivateRedis, private_client: aioredis.Redis
) -> None:
    prefix = "lost:"
    flaky = create_client(private_redis.url, timeout=0.1)
    assert flaky is not None
    metrics = Metrics()
    sink = RedisSink(flaky, metrics, prefix=prefix, flush_interval=INTERVAL, op_timeout=0.4)
    try:
        _bump(metrics, 1)
        assert await sink.push()  # the push script is known to the server from now on
        _bump(metrics, 2)

        async with _frozen(private_redis):
            # The client gives up, yet the server has the push in its input and runs it on waking.
            assert not await sink.push()
        lost = sink.pending_id
        assert lost is not None
        assert not sink.healthy

        raw = await _raw(private_client, prefix)
        assert raw["message_count"] == 3 + 6, "the timed-out push was applied after all"
        assert await private_client.exists(sink.push_key(lost))
        # Applied but unacknowledged: the totals must not add its deltas a second time.
        totals = await sink.totals()
        assert totals["message_count"] == 9
        assert totals["latency_sum"] == pytest.approx(0.75)
        assert totals["error:redis"] == metrics.errors["redis"] >= 1

        assert await sink.push()  # the retry (same id) changes nothing ...
        assert sink.pending_id is None
        assert sink.healthy
        assert (await _raw(private_client, prefix))["message_count"] == 9
        metrics.count_messages(4)
        assert await sink.push()  # ... and the next push adds only what is new
    finally:
        await flaky.aclose()

    raw = await _raw(private_client, prefix)
    assert raw == pytest.approx(_nonzero(metrics.local_totals()))
    assert raw["message_count"] == 3 + 6 + 4
    assert raw["latency_count"] == 2
    assert raw["signal:open"] == 2


async def test_a_pending_push_is_retried_with_the_same_id_and_deltas(
    client: aioredis.Redis,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    port = await proxy.start()
    flaky = create_client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    assert flaky is not None
    sent: list[tuple[Any, ...]] = []  # (push-id key, deltas) of every EVALSHA attempt
    evalsha = flaky.evalsha

    def spy(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        sent.append((keys_and_args[1], keys_and_args[numkeys:]))
        return evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(flaky, "evalsha", spy)
    metrics = Metrics()
    sink = RedisSink(flaky, metrics, prefix=redis_prefix, flush_interval=INTERVAL)
    try:
        _bump(metrics, 1)
        assert await sink.push()
        first = sent[-1][0]

        await proxy.cut()
        metrics.count_messages(6)
        assert not await sink.push()
        pending = sink.pending_id
        assert pending is not None
        assert sent[-1][0] == sink.push_key(pending) != first
        attempt = sent[-1]
        metrics.count_messages(100)  # newer counts wait for the pending push to be acknowledged
        assert not await sink.push()
        assert sink.pending_id == pending
        assert sent[-1] == attempt

        await proxy.restore()
        # Never applied: its deltas are counted once, from the local counters.
        assert (await sink.totals())["message_count"] == 3 + 6 + 100
        retries = len(sent)
        assert await sink.push()
        assert sink.pending_id is None
    finally:
        await flaky.aclose()
        await proxy.stop()

    assert sent[retries] == attempt  # the retry: same id, same deltas
    newer = sent[retries + 1]
    assert newer[0] not in {first, attempt[0]}
    deltas = dict(zip(newer[1][1::3], newer[1][3::3], strict=True))
    assert deltas["message_count"] == 100
    raw = await _raw(client, redis_prefix)
    assert raw == pytest.approx(_nonzero(metrics.local_totals()))
    assert raw["message_count"] == 109
    for key in (first, attempt[0], newer[0]):
        assert 0 < await client.ttl(key) <= PUSH_ID_TTL_S


async def test_started_at_is_set_once_and_survives_later_pushes(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    m1, m2 = Metrics(), Metrics()
    s1 = RedisSink(client, m1, prefix=redis_prefix, flush_interval=INTERVAL)
    s2 = RedisSink(client, m2, prefix=redis_prefix, flush_interval=INTERVAL)
    assert await _started_at(client, redis_prefix) is None
    before = time.time()
    _bump(m1, 1)
    assert await s1.push()
    after = time.time()
    started = await _started_at(client, redis_prefix)
    assert started is not None
    # Redis' clock, to the microsecond; the same clock as ours on this machine.
    assert before - 0.01 <= started <= after + 0.01

    await asyncio.sleep(0.05)
    _bump(m1, 1)
    _bump(m2, 1)
    assert await s1.push()
    assert await s2.push()
    assert await _started_at(client, redis_prefix) == started
    totals = await s1.totals()
    assert totals[STARTED_AT] == started  # passed through, not summed with anything
    assert totals["message_count"] == 9
    assert STARTED_AT not in m1.local_totals()

    # Resetting the counters (deleting the hash) restarts the clock with the next push.
    await client.delete(redis_prefix + COUNTERS_KEY)
    m2.count_messages(1)
    assert await s2.push()
    restarted = await _started_at(client, redis_prefix)
    assert restarted is not None
    assert restarted > started
    assert await _raw(client, redis_prefix) == {"message_count": 1}
