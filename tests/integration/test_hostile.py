"""A hostile exchange against the real `depthflow serve` subprocess.

Every frame and every snapshot answer is the test's choice (`hostile_exchange`): deeply nested
JSON, an event claiming ids far ahead, a crossed snapshot, a snapshot trickled one byte a second,
a disconnect, an event sent twice, and a ``kill -9`` mid-stream. After each, from outside: every
frame sent is a stored tick or counted data loss, every stored WAP is the exchange's, and the
stored ticks plus ``data_gaps`` cover each symbol's update ids without hole or overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from depthflow.storage import db
from tests.conftest import PG_SERVER_URL, _unavailable
from tests.harness.databases import scratch_url
from tests.harness.hostile_exchange import (
    Event,
    ExchangeConnection,
    HostileExchange,
    ScriptedBook,
    SnapshotReply,
    nested,
)
from tests.harness.processes import (
    ServeProcess,
    events_named,
    exchange_env,
)
from tests.harness.prometheus import prometheus
from tests.ledger_check import Span, assert_sequence_covered, check_coverage

pytestmark = pytest.mark.services

STALE_RESYNC_S = 2.0
SNAPSHOT_TIMEOUT_S = 2.0
# Long enough that a test pausing between frames on a busy machine is not cut off as stalled.
FEED_STALL_S = 30.0
WAIT_S = 30.0  # generous: two busy cores


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def fresh_db() -> AsyncIterator[str]:
    """A database of this test's own, migrated, dropped afterwards (data_gaps included)."""
    url = scratch_url(PG_SERVER_URL, "depthflow_hostile")
    try:
        await db.migrate(url)
    except (OSError, asyncpg.PostgresError) as exc:
        _unavailable("PostgreSQL", exc)
    yield url
    await db.drop_database(url)


@pytest.fixture
async def running(fresh_db: str) -> AsyncIterator[contextlib.AsyncExitStack]:
    """Stops what a test starts (services, then the exchange) before its database is dropped."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def start_exchange(
    running: contextlib.AsyncExitStack, symbols: Sequence[str]
) -> HostileExchange:
    exchange = HostileExchange(symbols)
    await exchange.start()
    running.push_async_callback(exchange.stop)
    return exchange


async def start_serve(
    running: contextlib.AsyncExitStack,
    exchange: HostileExchange,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    log_path: Path,
    **extra: str,
) -> ServeProcess:
    assert exchange.port is not None
    env = exchange_env(
        exchange.port,
        list(exchange.books),
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        **{
            "BATCH_MAX_DELAY_MS": "50",
            "METRICS_FLUSH_MS": "100",
            "STALE_RESYNC_S": str(STALE_RESYNC_S),
            "SNAPSHOT_TIMEOUT_S": str(SNAPSHOT_TIMEOUT_S),
            "FEED_STALL_S": str(FEED_STALL_S),
            **extra,
        },
    )
    serve = ServeProcess(env=env, log_path=log_path)
    running.push_async_callback(_stop_quietly, serve)
    await serve.start()
    return serve


async def _stop_quietly(serve: ServeProcess) -> None:
    if serve.process is not None:
        await serve.stop()


# -- reading the service -------------------------------------------------------------------------


async def sample(client: httpx.AsyncClient, key: str) -> float:
    return (await prometheus(client)).get(key, 0.0)


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, wait_s: float = WAIT_S
) -> float:
    """Poll ``check`` until true; returns how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < wait_s:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out after {wait_s} s waiting for {what}")


async def wait_sample(
    client: httpx.AsyncClient, key: str, at_least: float, wait_s: float = WAIT_S
) -> float:
    async def reached() -> bool:
        return await sample(client, key) >= at_least

    return await wait_until(reached, f"{key} >= {at_least}", wait_s)


async def books(client: httpx.AsyncClient) -> dict[str, str]:
    body = (await client.get("/health")).json()
    result: dict[str, str] = body["checks"]["books"]
    return result


async def wait_live(client: httpx.AsyncClient, wait_s: float = WAIT_S) -> None:
    async def live() -> bool:
        return all(state == "live" for state in (await books(client)).values())

    await wait_until(live, "every book live", wait_s)


async def wait_handled(client: httpx.AsyncClient, exchange: HostileExchange, base: int = 0) -> None:
    """Until the service counted every frame the exchange sent (``base``: sent to earlier runs)."""
    await wait_sample(client, "depthflow_messages_total", exchange.frames_sent - base)


async def metrics_doc(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def stored_ticks(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.asyncpg_dsn(database_url))
    try:
        return list(
            await conn.fetch(
                "SELECT symbol, first_update_id, last_update_id, wap FROM price_ticks ORDER BY id"
            )
        )
    finally:
        await conn.close()


async def stored_gaps(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.asyncpg_dsn(database_url))
    try:
        return list(
            await conn.fetch(
                "SELECT symbol, from_update_id, to_update_id, reason FROM data_gaps ORDER BY id"
            )
        )
    finally:
        await conn.close()


async def send_paced(
    conn: ExchangeConnection, events: Sequence[Event | str], every_s: float = 0.0
) -> None:
    for event in events:
        conn.send(event)
        if every_s:
            await asyncio.sleep(every_s)
    await conn.drain()


async def assert_book_matches(client: httpx.AsyncClient, book: ScriptedBook) -> None:
    """``/book`` shows the exchange's book, id and levels (20 a side)."""
    shown = (await client.get(f"/book/{book.symbol}", params={"depth": 20})).json()
    bids, asks = book.top(20)
    assert shown["last_update_id"] == book.last_update_id, shown
    assert shown["bids"] == bids, shown
    assert shown["asks"] == asks, shown


async def terminate(serve: ServeProcess) -> dict[str, Any]:
    """SIGTERM; the counters of the final ``service_stopped`` line."""
    code = await serve.stop()
    assert code in {0, -15}, serve.log_text()[-5000:]
    stopped = events_named(serve, "service_stopped")
    assert len(stopped) == 1, serve.log_text()[-5000:]
    return stopped[0]


async def check_accounting(
    serve: ServeProcess,
    exchange: HostileExchange,
    database_url: str,
    *,
    connections: Sequence[ExchangeConnection] | None = None,
    ticks_before: int = 0,
    allow_rewound: bool = False,
) -> dict[str, Any]:
    """Stop ``serve`` and check, from outside, that nothing went unaccounted.

    Every frame the exchange sent on ``connections`` (default: all) was counted; each is a tick
    or counted data loss; the database holds those ticks (plus ``ticks_before`` of earlier runs)
    once each, with the exchange's WAP; and the stored sequence is covered.
    """
    final = await terminate(serve)
    sent = sum(c.sent for c in (connections if connections is not None else exchange.connections))
    assert final["message_count"] == sent, (final, sent)
    assert final["message_count"] == final["tick_count"] + final["data_loss_count"], final
    ticks = await stored_ticks(database_url)
    assert len(ticks) == ticks_before + final["tick_count"], (len(ticks), final)
    keys = [(t["symbol"], t["last_update_id"]) for t in ticks]
    assert len(set(keys)) == len(keys), "a tick was stored twice"
    wrong = [
        dict(t)
        for t in ticks
        if exchange.books[t["symbol"].lower()].expected_wap.get(t["last_update_id"]) != t["wap"]
    ]
    assert wrong == [], "stored WAPs differ from the exchange's book"
    assert not events_named(serve, "frame_failed"), "a frame raised inside the pipeline"
    await assert_sequence_covered(database_url, allow_rewound=allow_rewound)
    return final


# -- tests ---------------------------------------------------------------------------------------


async def test_deeply_nested_frames_are_malformed_and_ingest_goes_on(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix, tmp_path / "serve.log"
    )
    book = exchange.books["btcusdt"]
    hostile = [
        '{"stream":"x","junk":' + nested(1000) + ',"data":{}}',
        nested(1000),
        nested(100_000),  # 200 KB of brackets, well inside the 4 MiB frame limit
        '{"stream":"btcusdt@depth@100ms","data":' + nested(1000, "1") + "}",
    ]
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        conn = await exchange.connection(1)
        await wait_live(client)
        await send_paced(conn, [book.random_event() for _ in range(5)])
        await send_paced(conn, hostile)
        await send_paced(conn, [book.random_event() for _ in range(5)])
        await wait_handled(client, exchange)
        await wait_sample(client, "depthflow_ticks_total", 10)

        live = await client.get("/live")
        assert live.status_code == 200, live.text

        async def counted() -> bool:
            malformed: int = (await metrics_doc(client))["data_loss"].get("malformed", 0)
            return malformed >= len(hostile)

        await wait_until(counted, "/metrics to count the nested frames as malformed")
        document = await metrics_doc(client)
        assert document["data_loss"].get("malformed") == len(hostile), document
        assert document["errors"].get("malformed") == len(hostile), document
        assert "internal" not in document["data_loss"], document
        assert (await books(client)) == {"BTCUSDT": "live"}
        # The book is still the exchange's, level for level.
        await assert_book_matches(client, book)
    final = await check_accounting(serve, exchange, fresh_db)
    assert final["tick_count"] == 10


async def test_event_far_ahead_is_resynced_after_stale_resync_s(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix, tmp_path / "serve.log"
    )
    book = exchange.books["btcusdt"]
    stale_key = 'depthflow_resyncs_total{reason="stale"}'
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        conn = await exchange.connection(1)
        await wait_live(client)
        await send_paced(conn, [book.random_event() for _ in range(5)])
        await wait_sample(client, "depthflow_ticks_total", 5)

        local = book.last_update_id
        forged = book.forged(local + 1, local + 10**12)
        await send_paced(conn, [forged])
        sent_at = time.monotonic()
        # The exchange goes on as if nothing happened; the book ignores it all as stale...
        while await sample(client, stale_key) < 1:
            assert time.monotonic() - sent_at < STALE_RESYNC_S + 20, "no stale resync"
            await send_paced(conn, [book.random_event()])
            await asyncio.sleep(0.1)
        resynced_after = time.monotonic() - sent_at
        # ...until STALE_RESYNC_S of nothing but stale events: resynced, ticks stored again.
        assert resynced_after >= STALE_RESYNC_S - 0.5
        assert resynced_after < STALE_RESYNC_S + 10
        await wait_live(client)
        ticks_before = await sample(client, "depthflow_ticks_total")
        await send_paced(conn, [book.random_event() for _ in range(5)], every_s=0.02)
        await wait_handled(client, exchange)
        await wait_sample(client, "depthflow_ticks_total", ticks_before + 5)
        shown = (await client.get("/book/btcusdt")).json()
        assert shown["last_update_id"] == book.last_update_id
    final = await check_accounting(serve, exchange, fresh_db, allow_rewound=True)
    assert final["resync:stale"] == 1, final
    assert final["data_loss:stale"] >= 1, final
    assert len(events_named(serve, "sequence_rewound")) == 1
    ticks = await stored_ticks(fresh_db)
    assert any(t["last_update_id"] == local + 10**12 for t in ticks)
    assert ticks[-1]["last_update_id"] == book.last_update_id


async def test_crossed_snapshot_resyncs_once_then_a_sane_one_goes_live(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    book = exchange.books["btcusdt"]
    crossed = json.dumps(
        {
            # Ahead of the events sent right away, so they may be buffered when it lands.
            "lastUpdateId": book.last_update_id + 3,
            "bids": [["100.05", "1.000"], ["99.99", "1.000"]],
            "asks": [["99.95", "1.000"], ["100.01", "1.000"]],
        }
    )
    # Both answers are slow: events arrive meanwhile and wait in the sync buffer.
    exchange.script_snapshot(
        "btcusdt", SnapshotReply(body=crossed, delay_s=1.0), SnapshotReply(delay_s=1.5)
    )
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix, tmp_path / "serve.log"
    )
    crossed_key = 'depthflow_resyncs_total{reason="crossed"}'
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        conn = await exchange.connection(1)
        await send_paced(conn, [book.random_event() for _ in range(5)])
        await wait_sample(client, crossed_key, 1)
        await send_paced(conn, [book.random_event() for _ in range(10)], every_s=0.05)
        await wait_live(client)
        await send_paced(conn, [book.random_event() for _ in range(10)], every_s=0.02)
        await wait_handled(client, exchange)
        samples = await prometheus(client)
        assert samples.get(crossed_key) == 1, samples
        await assert_book_matches(client, book)
    final = await check_accounting(serve, exchange, fresh_db)
    assert len(exchange.snapshots_of("btcusdt")) >= 2
    resyncs = [r for r in events_named(serve, "book_resync") if r.get("reason") == "crossed"]
    assert len(resyncs) == 1, resyncs
    assert not events_named(serve, "crossed_book"), "a warning per event on a crossed book"
    assert final.get("data_loss:crossed", 0) == 0, final
    assert final["tick_count"] >= 10, final


async def test_trickled_snapshot_hits_the_deadline_and_the_next_one_succeeds(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    book = exchange.books["btcusdt"]
    exchange.script_snapshot(
        "btcusdt",
        SnapshotReply(trickle_s=1.0),
        # Then more garbage before a good one: each is one snapshot error, none is fatal.
        SnapshotReply(status=500, body='{"code":-1000,"msg":"An unknown error occurred."}'),
        SnapshotReply(body=nested(100_000)),
        SnapshotReply(body='{"lastUpdateId":-1,"bids":[],"asks":[]}'),
        SnapshotReply(body='{"lastUpdateId":5,"bids":[["nan","1"]],"asks":[]}'),
    )
    bad_answers = 5
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix, tmp_path / "serve.log"
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        conn = await exchange.connection(1)
        await wait_sample(client, 'depthflow_errors_total{kind="snapshot"}', bad_answers)
        await wait_live(client)
        await send_paced(conn, [book.random_event() for _ in range(5)])
        await wait_handled(client, exchange)
        await wait_sample(client, "depthflow_ticks_total", 5)
        document = await metrics_doc(client)
    trickled = exchange.snapshots_of("btcusdt")[0]
    assert trickled.reply.trickle_s == 1.0
    assert trickled.client_gone, trickled
    assert trickled.finished_at is not None
    held = trickled.finished_at - trickled.requested_at
    # Cut at the deadline (plus a trickle interval and a busy machine), not after the whole body.
    assert SNAPSHOT_TIMEOUT_S - 0.5 <= held <= SNAPSHOT_TIMEOUT_S + 5, held
    assert trickled.bytes_sent < len(trickled.body)
    assert document["errors"].get("snapshot", 0) == bad_answers, document
    assert len(exchange.snapshots_of("btcusdt")) == bad_answers + 1
    failed = events_named(serve, "snapshot_failed")
    assert failed, "no snapshot_failed line"
    assert "timeout" in failed[0]["error"].lower(), failed
    await check_accounting(serve, exchange, fresh_db)


async def test_disconnect_resets_every_book_and_records_the_skipped_ids(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt", "ethusdt"])
    btc, eth = exchange.books["btcusdt"], exchange.books["ethusdt"]
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix, tmp_path / "serve.log"
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        first = await exchange.connection(1)
        await wait_live(client)
        for _ in range(5):
            first.send(btc.random_event(), eth.random_event())
        await first.drain()
        await wait_sample(client, "depthflow_ticks_total", 10)
        btc_stored = btc.last_update_id

        exchange.refuse_streams = True  # hold the reconnect, to look at the service meanwhile
        first.drop()
        await first.wait_closed()

        async def all_reset() -> bool:
            for symbol in ("btcusdt", "ethusdt"):
                shown = (await client.get(f"/book/{symbol}")).json()
                if shown["last_update_id"] is not None or shown["bids"] or shown["asks"]:
                    return False
            states = await books(client)
            return all(state in {"waiting", "buffering"} for state in states.values())

        took = await wait_until(all_reset, "every book reset after the disconnect", 20)
        health = (await client.get("/health")).json()
        assert health["checks"]["feed"] == "disconnected", health
        assert health["status"] == "DEGRADED", health
        # While away, btcusdt moves on (ids nobody will receive); ethusdt does not.
        btc.skip(3)
        await wait_until(_refused(exchange), "a refused reconnect attempt", 10)
        exchange.refuse_streams = False
        second = await exchange.connection(2)
        await wait_live(client)
        for _ in range(5):
            second.send(btc.random_event(), eth.random_event())
        await second.drain()
        await wait_handled(client, exchange)
        await wait_sample(client, "depthflow_ticks_total", 20)
        for book in (btc, eth):
            await assert_book_matches(client, book)
    final = await check_accounting(serve, exchange, fresh_db)
    assert took < 20
    gaps = [dict(g) for g in await stored_gaps(fresh_db)]
    assert gaps == [
        {
            "symbol": "BTCUSDT",
            "from_update_id": btc_stored + 1,
            "to_update_id": btc_stored + 3,
            "reason": "reconnect",
        }
    ], gaps
    assert final["resync:reconnect"] == 2, final  # one per live book


def _refused(exchange: HostileExchange) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return exchange.refused >= 1

    return check


async def test_event_sent_twice_is_stored_once(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    book = exchange.books["btcusdt"]
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix, tmp_path / "serve.log"
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        conn = await exchange.connection(1)
        await wait_live(client)
        events = [book.random_event() for _ in range(5)]
        # The third event twice in a row, the second again later: verbatim, same bytes.
        frames = [events[0], events[1], events[2], events[2], events[3], events[1], events[4]]
        await send_paced(conn, frames)
        await wait_handled(client, exchange)
        await wait_sample(client, "depthflow_ticks_total", 5)
    final = await check_accounting(serve, exchange, fresh_db)
    assert final["tick_count"] == 5
    assert final["data_loss:stale"] == 2, final
    ticks = await stored_ticks(fresh_db)
    assert [t["last_update_id"] for t in ticks] == [e.last_update_id for e in events]


async def test_kill_9_mid_stream_then_restart_records_the_hole(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    book = exchange.books["btcusdt"]
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix + "run1:", tmp_path / "serve1.log"
    )
    stop_sending = asyncio.Event()

    async def stream(conn: ExchangeConnection) -> None:
        while not stop_sending.is_set() and conn.open:
            conn.send(book.random_event())
            await asyncio.sleep(0.005)

    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        first = await exchange.connection(1)
        await wait_live(client)
        sender = asyncio.create_task(stream(first))
        try:

            async def some_stored() -> bool:
                return len(await stored_ticks(fresh_db)) >= 50

            await wait_until(some_stored, "50 ticks in the database")
            assert serve.process is not None
            serve.process.kill()  # mid-stream, frames flowing, rows in the writer's memory
            await serve.process.wait()
        finally:
            stop_sending.set()
            await sender
    assert await serve.stop() == -9
    await first.wait_closed()
    run1 = await stored_ticks(fresh_db)
    last_stored = max(t["last_update_id"] for t in run1)
    lost_by_kill = first.sent - len(run1)
    assert lost_by_kill >= 0

    made_in_run1 = book.last_update_id  # made, sent or not (some were still queued at the kill)
    book.skip(4)  # the exchange moves on while nothing listens
    restarted = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix + "run2:", tmp_path / "serve2.log"
    )
    async with httpx.AsyncClient(base_url=restarted.base_url, timeout=10) as client:
        second = await exchange.connection(2)
        await wait_live(client)
        await send_paced(second, [book.random_event() for _ in range(10)], every_s=0.01)
        await wait_sample(client, "depthflow_messages_total", second.sent)
        await wait_sample(client, "depthflow_ticks_total", 10)
    await check_accounting(
        restarted, exchange, fresh_db, connections=[second], ticks_before=len(run1)
    )
    ticks = await stored_ticks(fresh_db)
    run2_first = min(t["first_update_id"] for t in ticks if t["first_update_id"] > last_stored)
    gaps = [dict(g) for g in await stored_gaps(fresh_db) if g["reason"] == "restart"]
    assert gaps == [
        {
            "symbol": "BTCUSDT",
            "from_update_id": last_stored + 1,
            "to_update_id": run2_first - 1,
            "reason": "restart",
        }
    ], (gaps, last_stored, run2_first, lost_by_kill)
    # The hole: what run 1 received but never stored, what it never got, and what nobody got.
    assert run2_first - 1 - last_stored == made_in_run1 - last_stored + 4


async def test_silent_connection_is_replaced_after_feed_stall_s(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    stall_s = 3.0
    exchange = await start_exchange(running, ["btcusdt"])
    book = exchange.books["btcusdt"]
    serve = await start_serve(
        running,
        exchange,
        fresh_db,
        redis_url,
        redis_prefix,
        tmp_path / "serve.log",
        FEED_STALL_S=str(stall_s),
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        first = await exchange.connection(1)
        await wait_live(client)
        await send_paced(first, [book.random_event() for _ in range(3)])
        silent_from = time.monotonic()
        # The exchange keeps the connection open (and answers pings) but sends nothing.
        second = await exchange.connection(2, timeout=stall_s + 20)
        replaced_after = time.monotonic() - silent_from
        assert first.closed.is_set()
        assert first.websocket.close_code == 1001, first.websocket.close_code
        await wait_live(client)
        await send_paced(second, [book.random_event() for _ in range(3)])
        await wait_handled(client, exchange)
        await wait_sample(client, "depthflow_ticks_total", 6)
        assert (await client.get("/live")).status_code == 200
    assert stall_s - 0.5 <= replaced_after <= stall_s + 10, replaced_after
    final = await check_accounting(serve, exchange, fresh_db)
    assert events_named(serve, "feed_stalled")
    assert final["error:connection"] >= 1, final
    # Nothing was skipped: the sequence goes on with no recorded hole.
    assert await stored_gaps(fresh_db) == []


def test_ledger_check_finds_holes_overlaps_and_rewinds() -> None:
    def spans(*ranges: tuple[int, int, str]) -> list[Span]:
        return sorted(Span(a, b, kind, i) for i, (a, b, kind) in enumerate(ranges))

    good = check_coverage("X", spans((1, 5, "tick"), (6, 9, "gap"), (10, 10, "tick")))
    assert good.problems == []
    assert (good.first, good.last, good.ticks, good.gaps) == (1, 10, 2, 1)
    hole = check_coverage("X", spans((1, 5, "tick"), (8, 9, "tick")))
    assert hole.problems[0].startswith("hole: ids [6, 7]"), hole.problems
    overlap = check_coverage("X", spans((1, 5, "tick"), (5, 9, "tick")))
    assert overlap.problems[0].startswith("overlap"), overlap.problems
    duplicate = check_coverage("X", spans((1, 5, "tick"), (6, 6, "tick"), (6, 6, "tick")))
    assert len(duplicate.problems) == 1, duplicate.problems
    far = spans((1, 5, "tick"), (6, 10**12, "tick"), (8, 8, "tick"), (9, 9, "tick"))
    assert check_coverage("X", far).problems, "a rewind is an overlap unless allowed"
    rewound = check_coverage("X", far, allow_rewound=True)
    assert rewound.problems == []
    assert [s.start for s in rewound.rewound] == [8]
    # A rewind does not excuse a hole after it.
    far_hole = spans((1, 5, "tick"), (6, 10**12, "tick"), (8, 8, "tick"), (11, 11, "tick"))
    assert check_coverage("X", far_hole, allow_rewound=True).problems


async def test_restart_after_a_far_ahead_tick_still_records_the_hole(
    fresh_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    exchange = await start_exchange(running, ["btcusdt"])
    book = exchange.books["btcusdt"]
    serve = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix + "run1:", tmp_path / "serve1.log"
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        conn = await exchange.connection(1)
        await wait_live(client)
        await send_paced(conn, [book.random_event() for _ in range(3)])
        local = book.last_update_id
        await send_paced(conn, [book.forged(local + 1, local + 10**12)])
        while await sample(client, 'depthflow_resyncs_total{reason="stale"}') < 1:
            await send_paced(conn, [book.random_event()])
            await asyncio.sleep(0.1)
        await wait_live(client)
        await send_paced(conn, [book.random_event() for _ in range(3)])
        await wait_handled(client, exchange)
    await check_accounting(serve, exchange, fresh_db, allow_rewound=True)
    book.skip(5)  # a hole while nothing runs
    restarted = await start_serve(
        running, exchange, fresh_db, redis_url, redis_prefix + "run2:", tmp_path / "serve2.log"
    )
    async with httpx.AsyncClient(base_url=restarted.base_url, timeout=10) as client:
        second = await exchange.connection(2)
        await wait_live(client)
        await send_paced(second, [book.random_event() for _ in range(3)])
        await wait_sample(client, "depthflow_messages_total", second.sent)
    await terminate(restarted)
    gaps = [dict(g) for g in await stored_gaps(fresh_db) if g["reason"] == "restart"]
    assert len(gaps) == 1, gaps
    await assert_sequence_covered(fresh_db, allow_rewound=True)
