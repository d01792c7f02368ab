"""HTTP limits of a real `depthflow serve`: half-open request heads are closed after the header
timeout while /health keeps answering, requests beyond the concurrency limit get a fast 503, and a
query blocked by a lock is cancelled by the statement timeout (503)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from depthflow.simulate.server import Simulator
from depthflow.storage.db import asyncpg_dsn
from tests.harness.processes import ServeProcess, exchange_env

SYMBOLS = ("btcusdt",)
HALF_OPEN = 600  # more than the default limit_concurrency (512)
HEADER_TIMEOUT_S = 1.0
# Generous for a loaded 2-core machine: the server only has to get to the timers.
MARGIN_S = 20.0


async def start_serve(
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    prefix: str,
    **extra: str,
) -> ServeProcess:
    sim = Simulator(SYMBOLS, seed=3, rate=5.0)
    await sim.start()
    running.push_async_callback(sim.stop)
    assert sim.port is not None
    env = exchange_env(
        sim.port,
        SYMBOLS,
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        **extra,
    )
    serve = ServeProcess(env=env, log_path=tmp_path / "serve.log")
    running.push_async_callback(stop_serve, serve)
    await serve.start()
    return serve


async def stop_serve(serve: ServeProcess) -> None:
    if serve.process is not None:
        await serve.stop()


async def half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader) -> float:
    """Waits for EOF (or a reset) from the server; the time it came."""
    with contextlib.suppress(ConnectionError):
        assert await reader.read(65536) == b"", "the server answered a request it never got"
    return time.monotonic()


async def test_half_open_heads_are_closed_and_health_keeps_answering(
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    serve = await start_serve(
        running,
        tmp_path,
        clean_db,
        redis_url,
        redis_prefix,
        HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    )
    sockets = []
    try:
        sent = time.monotonic()
        for _ in range(HALF_OPEN // 50):
            sockets += await asyncio.gather(*(half_open(serve.port) for _ in range(50)))
        all_sent = time.monotonic()
        closes = asyncio.gather(*(closed_by_server(reader) for reader, _ in sockets))

        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10.0) as client:
            while not closes.done() and time.monotonic() < all_sent + HEADER_TIMEOUT_S + MARGIN_S:
                statuses.append((await client.get("/health")).status_code)
                await asyncio.sleep(0.05)
        closed_at = await asyncio.wait_for(closes, HEADER_TIMEOUT_S + MARGIN_S)
    finally:
        for _, writer in sockets:
            writer.close()

    assert len(closed_at) == HALF_OPEN
    # Closed by the header timer: not before it, and all of them shortly after it.
    assert min(closed_at) - sent >= HEADER_TIMEOUT_S * 0.8
    assert max(closed_at) - all_sent <= HEADER_TIMEOUT_S + MARGIN_S
    # Half-open heads do not count toward limit_concurrency: no 503 for a real client.
    assert statuses, "no /health request was made during the attack"
    assert set(statuses) == {200}, statuses
    assert serve.process is not None
    assert serve.process.returncode is None
    print(
        f"{HALF_OPEN} half-open heads closed {min(closed_at) - sent:.2f}.."
        f"{max(closed_at) - sent:.2f} s after the first was sent; "
        f"{len(statuses)} /health answered 200 meanwhile"
    )


@contextlib.asynccontextmanager
async def exclusive_lock(url: str, table: str) -> AsyncIterator[None]:
    holder = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with holder.transaction():
            await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await holder.close()


async def lock_waiters(url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        waiting: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND query LIKE '%FROM price_ticks%'"
        )
        return waiting
    finally:
        await conn.close()


async def test_requests_beyond_the_concurrency_limit_get_503(
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    limit = 4
    serve = await start_serve(
        running,
        tmp_path,
        clean_db,
        redis_url,
        redis_prefix,
        HTTP_LIMIT_CONCURRENCY=str(limit),
        API_STATEMENT_TIMEOUT_MS="60000",
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=90.0) as client:
        async with exclusive_lock(clean_db, "price_ticks"):
            # uvicorn counts the new connection too: limit - 1 requests in flight fill it.
            blocked = [
                asyncio.create_task(client.get("/ticks", params={"limit": 1}))
                for _ in range(limit - 1)
            ]
            for _ in range(600):
                if await lock_waiters(clean_db) >= limit - 1:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the /ticks requests never reached the lock")
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=serve.base_url, timeout=30.0) as other:
                over = await other.get("/health")
            elapsed = time.monotonic() - started
            assert over.status_code == 503
            assert over.text == "Service Unavailable"
            assert elapsed < 15
        # The lock is gone: the blocked requests finish normally.
        answers = await asyncio.gather(*blocked)
        assert [a.status_code for a in answers] == [200] * (limit - 1)
        assert (await client.get("/health")).status_code == 200
    print(f"the request beyond the limit got 503 in {elapsed:.3f} s")


async def test_a_query_blocked_by_a_lock_answers_503_within_the_statement_timeout(
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    timeout_ms = 500
    serve = await start_serve(
        running,
        tmp_path,
        clean_db,
        redis_url,
        redis_prefix,
        API_STATEMENT_TIMEOUT_MS=str(timeout_ms),
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=30.0) as client:
        async with exclusive_lock(clean_db, "price_ticks"):
            started = time.monotonic()
            response = await client.get("/ticks", params={"symbol": "btcusdt"})
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert "statement timeout" in response.json()["detail"]
            # About the statement timeout; far less than the 30 s the client would wait.
            assert timeout_ms / 1000 * 0.8 <= elapsed < 15
            # The rest of the API is not held by the blocked table.
            assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ticks", params={"symbol": "btcusdt"})).status_code == 200
    print(f"/ticks behind an ACCESS EXCLUSIVE lock answered 503 in {elapsed:.3f} s")


async def test_a_thousand_concurrent_health_probes_all_say_ok(
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    # Probes read one shared check result: a burst neither waits on PostgreSQL and Redis nor
    # makes them look down (before: 167 of 500 concurrent /health said DEGRADED).
    probes = 1000
    serve = await start_serve(
        running,
        tmp_path,
        clean_db,
        redis_url,
        redis_prefix,
        HTTP_LIMIT_CONCURRENCY=str(2 * probes),
    )
    limits = httpx.Limits(max_connections=probes, max_keepalive_connections=probes)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=60.0, limits=limits) as client:
        for _ in range(600):  # until the book is live: only then is the answer OK
            if (await client.get("/health")).json()["status"] == "OK":
                break
            await asyncio.sleep(0.1)
        answers = await asyncio.gather(*(client.get("/health") for _ in range(probes)))
    statuses = [(a.status_code, a.json()["status"]) for a in answers]
    assert statuses == [(200, "OK")] * probes, {s: statuses.count(s) for s in set(statuses)}
    assert all(a.json()["checks"]["database"] == "ok" for a in answers)
