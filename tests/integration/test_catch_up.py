"""A book that catches up on a large sync buffer lets everything else run meanwhile.

The stand-in exchange holds the snapshot back while 50,000 events (about 20 levels each, as
real ones) reach the service; once it answers, the feed replays the buffer in time slices. A
probe task on the same loop records, every turn it gets, whether the book is still catching up
and how many rows the writer has committed: the writer must commit rows and the probe must run
many times while the replay is going on. (How long the loop's longest pause is, is measured by
`python -m bench catch-up`, not asserted here.)
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable

import asyncpg

from depthflow.config import Settings
from depthflow.service import Service
from depthflow.storage import db
from tests.harness.hostile_exchange import HostileExchange, SnapshotReply, real_shaped

EVENTS = 50_000


async def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout: float = 120.0,  # noqa: ASYNC109
    report: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {report()}"
        await asyncio.sleep(0.05)


async def test_catching_up_on_50k_buffered_events_lets_the_writer_and_the_loop_run(
    make_settings: Callable[..., Settings], clean_db: str
) -> None:
    async with HostileExchange(["btcusdt"]) as exchange:
        port = exchange.port
        book = exchange.books["btcusdt"]
        rng = random.Random(7)
        first = real_shaped(book, rng)
        # The snapshot a live client gets a moment after its first event, held back by the test.
        gate = asyncio.Event()
        exchange.script_snapshot("btcusdt", SnapshotReply(body=book.snapshot(), gate=gate))
        # Made before the service starts: making them holds this loop for seconds.
        rest = [real_shaped(book, rng) for _ in range(EVENTS - 1)]
        settings = make_settings(
            symbols="btcusdt",
            binance_ws_url=f"ws://127.0.0.1:{port}",
            binance_rest_url=f"http://127.0.0.1:{port}",
            snapshot_timeout_s=600,
            audit_interval_s=0,
            batch_max_delay_ms=50,
        )
        service = Service(settings)
        await service.start()
        try:
            connection = await exchange.connection(1)
            connection.send(first)
            for start in range(0, len(rest), 1000):
                connection.send(*rest[start : start + 1000])
                await asyncio.sleep(0)
            sync = service.pipeline.book("btcusdt")
            assert sync is not None
            await wait_for(
                lambda: sync.buffered == EVENTS,
                "every event buffered",
                report=lambda: f"{sync.state} buffered={sync.buffered} sent={exchange.frames_sent}",
            )

            samples: list[tuple[bool, int, float]] = []

            async def probe() -> None:
                while True:
                    rows = service.writer.rows_written["price_ticks"]
                    samples.append((sync.catching_up, rows, time.monotonic()))
                    await asyncio.sleep(0)

            probing = asyncio.create_task(probe())
            gate.set()
            await wait_for(lambda: sync.live, "the book live")
            probing.cancel()
            during = [rows for catching_up, rows, _ in samples if catching_up]
            times = [at for catching_up, _, at in samples if catching_up]
            longest = max(b - a for a, b in itertools.pairwise(times))
            print(
                f"catch-up: {len(during)} probe turns over {times[-1] - times[0]:.2f} s, "
                f"{during[-1] - during[0]} ticks committed meanwhile, longest wait between two "
                f"turns {longest * 1000:.1f} ms"
            )
            assert len(during) >= 20, "the replay must hand the loop back while it runs"
            assert during[-1] > during[0], "the writer must commit rows during the replay"
        finally:
            await service.stop()
    conn = await asyncpg.connect(db.asyncpg_dsn(clean_db))
    try:
        # The first event is older than the snapshot; every other one is a stored tick.
        stored = await conn.fetchval("SELECT count(*) FROM price_ticks")
        losses = dict(service.metrics.data_loss), dict(service.metrics.resyncs)
        assert stored == EVENTS - 1, losses
    finally:
        await conn.close()
