"""`GET /book/{symbol}?at=`: the book at a past instant, rebuilt from stored checkpoints and level
updates, checked against an independent exact book of Binance's own recording."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from depthflow.api import create_app
from depthflow.config import Settings
from depthflow.replay import run_replay
from depthflow.storage.db import asyncpg_dsn
from tests.harness.real_data import SPOT, available, spot_frames, write_spot_recording

SYMBOL = "BTCUSDT"
DEPTH = 20
INSTANTS = 100


class ExactBook:
    """Snapshot + diffs in exact decimals, written from Binance's rules alone."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last_update_id = int(snapshot["lastUpdateId"])
        self.sides: dict[str, dict[Decimal, Decimal]] = {
            "b": {Decimal(p): Decimal(q) for p, q in snapshot["bids"]},
            "a": {Decimal(p): Decimal(q) for p, q in snapshot["asks"]},
        }

    def apply(self, data: dict[str, Any]) -> bool:
        if int(data["u"]) <= self.last_update_id:
            return False  # older than the book
        for side in ("b", "a"):
            levels = self.sides[side]
            for price, qty in data[side]:
                if Decimal(qty):
                    levels[Decimal(price)] = Decimal(qty)
                else:
                    levels.pop(Decimal(price), None)
        self.last_update_id = int(data["u"])
        return True

    def top(self, depth: int) -> tuple[list[list[float]], list[list[float]]]:
        bids = sorted(self.sides["b"].items(), reverse=True)[:depth]
        asks = sorted(self.sides["a"].items())[:depth]
        return (
            [[float(p), float(q)] for p, q in bids],
            [[float(p), float(q)] for p, q in asks],
        )


State = tuple[int, int, tuple[list[list[float]], list[list[float]]]]


@dataclass(frozen=True)
class Truth:
    """(update id, event time in ms) of every applied event, and the exact top 20 after the
    sampled ones (and after the last event sharing each sampled one's millisecond)."""

    events: list[tuple[int, int]]
    books: dict[int, State]  # by index into `events`
    by_id: list[int]  # the sampled indices
    by_time: list[int]  # the last index of the millisecond of each sampled index, a quarter


@pytest.fixture(scope="module")
def truth() -> Truth:
    if not available():
        pytest.skip(f"{SPOT} is not there")
    snapshot = json.loads((SPOT / "btcusdt.snapshot.json").read_text())
    frames = [json.loads(raw)["data"] for _, raw in spot_frames("btcusdt")]
    applied = [d for d in frames if int(d["u"]) > int(snapshot["lastUpdateId"])]
    events = [(int(d["u"]), int(d["E"])) for d in applied]
    rng = random.Random(20240808)
    by_id = sorted(rng.sample(range(len(events)), INSTANTS))
    last_of_ms = {ms: i for i, (_, ms) in enumerate(events)}
    by_time = [last_of_ms[events[i][1]] for i in by_id[::4]]
    wanted = set(by_id) | set(by_time)
    book = ExactBook(snapshot)
    books: dict[int, State] = {}
    for index, data in enumerate(applied):
        assert book.apply(data)
        if index in wanted:
            books[index] = (events[index][0], events[index][1], book.top(DEPTH))
    return Truth(events, books, by_id, by_time)


@pytest.fixture
async def replayed(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The BTCUSDT recording replayed into the test database, and an API over it."""
    if not available():
        pytest.skip(f"{SPOT} is not there")
    path = write_spot_recording("btcusdt", tmp_path / "btcusdt.ndjson.gz")
    # Every 30 s of event time: ~20 checkpoints over the 650 s recording.
    settings = make_settings(symbols="btcusdt", checkpoint_interval_s=30)
    summary = await run_replay(settings, path)
    assert summary["frames"] == 6_495
    app = create_app(settings, with_feed=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


async def test_the_book_at_random_past_instants_equals_the_exact_book(
    replayed: httpx.AsyncClient,
    truth: Truth,
    clean_db: str,
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(clean_db))
    try:
        checkpoints = await conn.fetchval("SELECT count(*) FROM book_checkpoints")
    finally:
        await conn.close()
    # One at the sync, then one every 30 s of event time.
    assert 15 <= checkpoints <= 25
    for index in truth.by_id:
        u, _, (bids, asks) = truth.books[index]
        # By update id: the book after the event.
        body = (await replayed.get(f"/book/{SYMBOL}", params={"at": u, "depth": DEPTH})).json()
        assert body["last_update_id"] == u
        assert (body["bids"], body["asks"]) == (bids, asks), f"book after u={u}"
    for index in truth.by_time:
        u, event_ms, (bids, asks) = truth.books[index]
        # By time: after the last event at or before the instant (events share milliseconds).
        at = datetime.fromtimestamp(event_ms / 1000, UTC).isoformat()
        body = (await replayed.get(f"/book/{SYMBOL}", params={"at": at, "depth": DEPTH})).json()
        assert body["last_update_id"] == u
        assert (body["bids"], body["asks"]) == (bids, asks), f"book at {at}"


async def test_past_book_errors_name_the_cause(
    replayed: httpx.AsyncClient,
    truth: Truth,
    clean_db: str,
) -> None:
    first_u = truth.events[0][0]
    before = await replayed.get(f"/book/{SYMBOL}", params={"at": first_u - 10_000})
    assert before.status_code == 404
    assert "no stored book" in before.json()["detail"]
    bad = await replayed.get(f"/book/{SYMBOL}", params={"at": "yesterday"})
    assert bad.status_code == 422
    naive = await replayed.get(f"/book/{SYMBOL}", params={"at": "2024-08-08T23:59:00"})
    assert naive.status_code == 422
    # A recorded hole after a checkpoint makes the instants after it unknowable, up to the next
    # checkpoint (a resync after a real hole writes one).
    conn = await asyncpg.connect(asyncpg_dsn(clean_db))
    try:
        ids = [r[0] for r in await conn.fetch("SELECT last_update_id FROM book_checkpoints")]
        checkpoint, following = sorted(ids)[len(ids) // 2 : len(ids) // 2 + 2]
        index = next(i for i, (u, _) in enumerate(truth.events) if u > checkpoint)
        (gap_from, gap_ms), (after_gap, _) = truth.events[index], truth.events[index + 1]
        await conn.execute(
            "INSERT INTO data_gaps (symbol, from_update_id, to_update_id, from_time, to_time, "
            "reason) VALUES ($1, $2, $3, $4, $5, 'overflow')",
            SYMBOL,
            gap_from,
            gap_from + 5,
            datetime.fromtimestamp(gap_ms / 1000, UTC),
            datetime.fromtimestamp(gap_ms / 1000, UTC) + timedelta(seconds=1),
        )
    finally:
        await conn.close()
    assert after_gap < following
    hole = await replayed.get(f"/book/{SYMBOL}", params={"at": after_gap})
    assert hole.status_code == 409
    assert hole.json()["detail"]["gap"] == {
        "from_update_id": gap_from,
        "to_update_id": gap_from + 5,
        "reason": "overflow",
    }
    # Before the hole, and from the next checkpoint on, the book is known.
    assert (await replayed.get(f"/book/{SYMBOL}", params={"at": checkpoint})).status_code == 200
    assert (await replayed.get(f"/book/{SYMBOL}", params={"at": following})).status_code == 200
