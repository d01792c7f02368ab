"""RedisSink against the real Redis: shared sums, delta pushes, Redis going away and coming back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from depthflow.metrics import Metrics
from depthflow.redis_sink import COUNTERS_KEY, RedisSink, create_client
from tests.tcp_proxy import TcpProxy

INTERVAL = 0.02


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    made = create_client(redis_url)
    assert made is not None
    yield made
    await made.aclose()


async def _raw(client: aioredis.Redis, prefix: str) -> dict[str, float]:
    raw = await client.hgetall(prefix + COUNTERS_KEY)
    return {_text(key): float(value) for key, value in raw.items()}


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
