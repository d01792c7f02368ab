"""Book audit: a shadow sync meets the live book at one update id, case by case and on the real
BTCUSDT recording."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from depthflow.accounting import AuditResult
from depthflow.audit import AuditReport, BookAudit, LevelDiff, SkipReason
from depthflow.book import BookSync, OrderBook, Outcome
from depthflow.events import DepthEvent, Snapshot, decode_frame, decode_snapshot

SYMBOL = "BTCUSDT"
Lv = list[tuple[float, float]]


def ev(first: int, last: int, bids: Lv | None = None, asks: Lv | None = None) -> DepthEvent:
    return DepthEvent(
        event_type="depthUpdate",
        event_time=1_700_000_000_000 + last,
        symbol=SYMBOL,
        first_update_id=first,
        last_update_id=last,
        bids=bids or [],
        asks=asks or [],
    )


def snap(last_update_id: int, bids: Lv | None = None, asks: Lv | None = None) -> Snapshot:
    return Snapshot(last_update_id=last_update_id, bids=bids or [], asks=asks or [])


BIDS: Lv = [(10.0, 1.0), (9.0, 2.0), (8.0, 3.0)]
ASKS: Lv = [(11.0, 1.0), (12.0, 2.0), (13.0, 3.0)]


def live_at(snapshot: Snapshot) -> BookSync:
    """A LIVE sync at `snapshot`'s id."""
    sync = BookSync(SYMBOL)
    sync.on_snapshot(snapshot)
    return sync


def feed(live: BookSync, audit: BookAudit, *events: DepthEvent) -> None:
    for event in events:
        assert live.on_event(event) is Outcome.APPLIED
        audit.on_event(event)


def poll(audit: BookAudit, live: BookSync) -> AuditReport | None:
    return audit.poll(live.book, live.last_update_id)


def matched(top_n: int = 20) -> tuple[BookSync, BookAudit]:
    """A live book and an audit whose shadow met it at id 102 (snapshot 100, one event)."""
    live = live_at(snap(100, BIDS, ASKS))
    audit = BookAudit(SYMBOL, top_n=top_n)
    audit.on_snapshot(snap(100, BIDS, ASKS))
    feed(live, audit, ev(101, 102))
    report = poll(audit, live)
    assert report is not None
    assert report.result is AuditResult.MATCH
    return live, audit


# --- meeting at one id --------------------------------------------------------------------------


def test_an_older_snapshot_is_brought_to_the_live_id_by_the_replay() -> None:
    live = live_at(snap(100, BIDS, ASKS))
    audit = BookAudit(SYMBOL)
    feed(live, audit, ev(101, 102, bids=[(10.0, 1.5)]), ev(103, 105, asks=[(11.0, 0.0)]))
    assert poll(audit, live) is None  # no snapshot yet
    audit.on_snapshot(snap(102, [(10.0, 1.5), (9.0, 2.0), (8.0, 3.0)], ASKS))
    assert audit.update_id == 105
    assert poll(audit, live) == AuditReport(AuditResult.MATCH, update_id=105, levels_compared=5)


def test_a_snapshot_ahead_of_the_live_book_waits_for_the_next_events() -> None:
    live = live_at(snap(100, BIDS, ASKS))
    audit = BookAudit(SYMBOL)
    feed(live, audit, ev(101, 102))
    # The REST server is often ahead of the stream: this snapshot already holds 103..107.
    audit.on_snapshot(snap(107, [(10.0, 4.0), (9.0, 2.0), (8.0, 3.0)], ASKS))
    assert poll(audit, live) is None
    feed(live, audit, ev(103, 105, bids=[(10.0, 4.0)]))
    assert poll(audit, live) is None
    feed(live, audit, ev(106, 107))
    report = poll(audit, live)
    assert report == AuditReport(AuditResult.MATCH, update_id=107, levels_compared=6)


def test_a_snapshot_at_the_live_id_with_nothing_buffered_compares_at_once() -> None:
    live = live_at(snap(100, BIDS, ASKS))
    audit = BookAudit(SYMBOL)
    audit.on_snapshot(snap(100, BIDS, ASKS))
    report = poll(audit, live)
    assert report is not None
    assert (report.result, report.update_id, report.levels_compared) == (AuditResult.MATCH, 100, 6)


# --- what is compared ---------------------------------------------------------------------------


def test_a_different_quantity_is_a_mismatch_naming_the_level() -> None:
    live, audit = matched()
    live.book.apply([(9.0, 2.5)], [])
    report = audit.compare(live.book, 102)
    assert report.result is AuditResult.MISMATCH
    assert report.differences == (LevelDiff("bid", 9.0, 2.5, 2.0),)
    assert report.mismatched == 1
    assert audit.stale_levels(live.book) == []  # the level exists, with another quantity


def test_local_levels_inside_the_window_the_exchange_lacks_are_stale() -> None:
    live, audit = matched()
    live.book.apply([(8.5, 0.7)], [(12.5, 0.1)])
    report = audit.compare(live.book, 102)
    assert report.result is AuditResult.MISMATCH
    assert report.differences == (
        LevelDiff("bid", 8.5, 0.7, None),
        LevelDiff("ask", 12.5, 0.1, None),
    )
    assert report.levels_compared == 8
    assert audit.stale_levels(live.book) == [("bid", 8.5), ("ask", 12.5)]


def test_a_level_missing_locally_is_a_mismatch() -> None:
    live, audit = matched()
    live.book.apply([], [(13.0, 0.0)])
    report = audit.compare(live.book, 102)
    assert report.differences == (LevelDiff("ask", 13.0, None, 3.0),)


def test_local_levels_beyond_the_snapshot_are_not_compared() -> None:
    # The snapshot lists the top levels only: deeper local levels may be real.
    live, audit = matched(top_n=20)
    live.book.apply([(5.0, 1.0), (7.99, 1.0)], [(13.01, 1.0), (40.0, 2.0)])
    report = audit.compare(live.book, 102)
    assert (report.result, report.levels_compared) == (AuditResult.MATCH, 6)
    assert audit.stale_levels(live.book) == []


def test_the_window_reaches_past_the_snapshot_best_levels() -> None:
    # Nothing existed above the snapshot's best bid, so every bid there came through an event.
    live, audit = matched(top_n=0)
    live.book.apply([(10.75, 1.0)], [(10.9, 1.0)])
    report = audit.compare(live.book, 102)
    assert report.differences == (
        LevelDiff("bid", 10.75, 1.0, None),
        LevelDiff("ask", 10.9, 1.0, None),
    )


def test_top_n_reaches_levels_outside_the_window_the_shadow_knows() -> None:
    # A deep level set by an event after the snapshot is known exactly on both sides.
    for top_n, result in ((3, AuditResult.MATCH), (4, AuditResult.MISMATCH)):
        live = live_at(snap(100, BIDS, ASKS))
        audit = BookAudit(SYMBOL, top_n=top_n)
        audit.on_snapshot(snap(100, BIDS, ASKS))
        feed(live, audit, ev(101, 101, bids=[(5.0, 1.0)]))
        live.book.apply([(5.0, 2.0)], [])
        report = audit.compare(live.book, 101)
        assert report.result is result, top_n
        if result is AuditResult.MISMATCH:
            assert report.differences == (LevelDiff("bid", 5.0, 2.0, 1.0),)


def test_an_empty_side_in_the_snapshot_makes_all_of_that_side_known() -> None:
    live = live_at(snap(100, BIDS, []))
    audit = BookAudit(SYMBOL, top_n=0)
    audit.on_snapshot(snap(100, BIDS, []))
    live.book.apply([], [(500.0, 1.0)])
    assert audit.compare(live.book, 100).differences == (LevelDiff("ask", 500.0, 1.0, None),)


def test_only_the_first_differences_are_kept_but_all_are_counted() -> None:
    live, audit = matched()
    live.book.apply([(8.5 + i / 16, 1.0) for i in range(8)], [])
    report = audit.compare(live.book, 102)
    assert report.mismatched == 8
    assert [d.price for d in report.differences] == [8.9375, 8.875, 8.8125, 8.75, 8.6875]


# --- skipped ------------------------------------------------------------------------------------


def skipped(report: AuditReport | None) -> SkipReason | None:
    assert report is not None
    assert report.result is AuditResult.SKIPPED
    assert report.differences == ()
    return report.reason


def test_a_snapshot_older_than_the_first_buffered_event_is_skipped() -> None:
    live = live_at(snap(100, BIDS, ASKS))
    audit = BookAudit(SYMBOL)
    feed(live, audit, ev(101, 104))
    audit.on_snapshot(snap(99, BIDS, ASKS))
    assert skipped(poll(audit, live)) is SkipReason.SNAPSHOT_TOO_OLD
    assert audit.update_id is None
    assert audit.stale_levels(live.book) == []


def test_a_gap_in_the_replay_or_after_it_is_skipped() -> None:
    audit = BookAudit(SYMBOL)
    audit.on_event(ev(101, 102))
    audit.on_event(ev(106, 107))  # 103..105 never came
    audit.on_snapshot(snap(102, BIDS, ASKS))
    assert skipped(audit.poll(OrderBook(), 107)) is SkipReason.GAP

    audit = BookAudit(SYMBOL)
    audit.on_snapshot(snap(100, BIDS, ASKS))
    audit.on_event(ev(102, 103))
    assert skipped(audit.poll(OrderBook(), 103)) is SkipReason.GAP
    audit.on_event(ev(104, 105))  # ignored from now on
    assert skipped(audit.compare(OrderBook(), 105)) is SkipReason.GAP


def test_a_full_shadow_buffer_is_skipped() -> None:
    audit = BookAudit(SYMBOL, max_buffer=1)
    audit.on_event(ev(101, 102))
    audit.on_event(ev(103, 104))
    assert skipped(audit.poll(OrderBook(), 104)) is SkipReason.OVERFLOW


def test_ids_that_cannot_meet_are_skipped() -> None:
    live = live_at(snap(100, BIDS, ASKS))
    assert live.on_event(ev(101, 102)) is Outcome.APPLIED
    audit = BookAudit(SYMBOL)
    assert skipped(audit.compare(live.book, 102)) is SkipReason.NO_SNAPSHOT
    # The shadow never saw 101..102 the live book applied: it is behind for good.
    audit.on_snapshot(snap(100, BIDS, ASKS))
    assert skipped(poll(audit, live)) is SkipReason.ID_MISMATCH
    assert skipped(audit.poll(live.book, None)) is SkipReason.NOT_LIVE


def test_a_second_snapshot_is_ignored() -> None:
    live, audit = matched()
    audit.on_snapshot(snap(102, [(10.0, 9.0)], ASKS))
    assert audit.compare(live.book, 102).result is AuditResult.MATCH


def test_top_n_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="top_n"):
        BookAudit(SYMBOL, top_n=-1)


# --- the real BTCUSDT recording -----------------------------------------------------------------

# The recordings live beside the repository (../shared), as on the CI machine.
DATA = Path(__file__).resolve().parents[2] / "shared/data/binance/spot-2024-08-08"
# The recording's first 2 events are older than its snapshot; the third straddles it.
SYNC_AT = 3
# Binance's REST snapshot, `limit=1000`.
SNAPSHOT_DEPTH = 1000


@dataclass(frozen=True)
class Recording:
    snapshot: Snapshot
    events: list[DepthEvent]
    truth: dict[int, dict[str, str]]  # the exact book's best levels after every applied event


@pytest.fixture(scope="module")
def recording() -> Recording:
    frames = DATA / "btcusdt.depth.frames.gz"
    if not frames.exists():
        pytest.skip(f"{frames} is not there")
    with gzip.open(frames, "rb") as lines:
        events = [decode_frame(line.split(b" ", 1)[1]) for line in lines]
    with gzip.open(DATA / "btcusdt.truth.jsonl.gz", "rt", encoding="utf-8") as rows:
        truth = {row["u"]: row for row in map(json.loads, rows)}
    snapshot = decode_snapshot((DATA / "btcusdt.snapshot.json").read_bytes())
    return Recording(snapshot, events, truth)


def synced_until(rec: Recording, stop: int) -> BookSync:
    """A sync that has handled the recording's snapshot and ``events[:stop]``."""
    sync = BookSync(SYMBOL)
    for event in rec.events[:SYNC_AT]:
        sync.on_event(event)
    assert [o for _, o in sync.on_snapshot(rec.snapshot)][-1] is Outcome.APPLIED
    for event in rec.events[SYNC_AT:stop]:
        assert sync.on_event(event) is Outcome.APPLIED
    return sync


def snapshot_after(rec: Recording, index: int) -> Snapshot:
    """What the REST endpoint would answer just after ``events[index]``: a true book state."""
    bids, asks = synced_until(rec, index + 1).book.top(SNAPSHOT_DEPTH)
    snapshot = Snapshot(
        last_update_id=rec.events[index].last_update_id,
        bids=[(price, qty) for price, qty in bids],
        asks=[(price, qty) for price, qty in asks],
    )
    row = rec.truth[snapshot.last_update_id]
    assert snapshot.bids[0] == (float(row["bid"]), float(row["bid_qty"]))
    assert snapshot.asks[0] == (float(row["ask"]), float(row["ask_qty"]))
    return snapshot


class LiveRun:
    """The recording fed to one live sync from start to end, with audits along the way."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.live = synced_until(rec, SYNC_AT)
        self.next = SYNC_AT

    def step(self, audit: BookAudit | None = None) -> None:
        event = self.rec.events[self.next]
        self.next += 1
        assert self.live.on_event(event) is Outcome.APPLIED
        if audit is not None:
            audit.on_event(event)

    def audit(self, start: int, snapshot: Snapshot, arrives_after: int) -> tuple[BookAudit, int]:
        """Send the request before ``events[start]``, get `snapshot` after
        ``events[arrives_after]``; returns the audit, polled to a verdict, and how many events
        that took after the snapshot."""
        while self.next < start:
            self.step()
        audit = BookAudit(SYMBOL)
        while self.next <= arrives_after:
            self.step(audit)
            assert self.poll(audit) is None
        audit.on_snapshot(snapshot)
        waited = 0
        while self.poll(audit) is None:
            self.step(audit)
            waited += 1
        return audit, waited

    def poll(self, audit: BookAudit) -> AuditReport | None:
        return audit.poll(self.live.book, self.live.last_update_id)


# (request sent before event, snapshot after event, snapshot arrives after event, events waited)
AUDITS = [
    (500, 505, 512, 0),  # the snapshot is older than what arrived: the replay catches up
    (2000, 2009, 2003, 6),  # the REST server is ahead of the stream: the live book catches up
    (3000, 3000, 3004, 0),  # holds exactly the first buffered event
    (4500, 4500, 4500, 0),
    (6400, 6410, 6400, 10),
]


def test_real_recording_audits_match_at_the_live_id(recording: Recording) -> None:
    run = LiveRun(recording)
    for start, index, arrives_after, waits in AUDITS:
        snapshot = snapshot_after(recording, index)
        audit, waited = run.audit(start, snapshot, arrives_after)
        report = run.poll(audit)
        assert report is not None
        assert report.result is AuditResult.MATCH, (start, report)
        assert waited == waits
        assert report.update_id == run.live.last_update_id
        assert report.update_id == recording.events[max(index, arrives_after)].last_update_id
        # Every level of the 1000-level window on each side, and none of the deeper ones the
        # live book holds from events long past.
        assert 1900 <= report.levels_compared <= 2100
        assert len(run.live.book) > report.levels_compared + 200
        assert audit.stale_levels(run.live.book) == []


def test_real_recording_corrupted_levels_are_mismatches(recording: Recording) -> None:
    run = LiveRun(recording)
    snapshot = snapshot_after(recording, 1503)
    audit, _ = run.audit(1500, snapshot, 1506)
    book, live_id = run.live.book, run.live.last_update_id
    assert live_id is not None
    assert audit.compare(book, live_id).result is AuditResult.MATCH
    bids, asks = book.top(SNAPSHOT_DEPTH)

    price, qty = bids[10]
    book.apply([(price, qty + 0.00001)], [])
    report = audit.compare(book, live_id)
    assert report.result is AuditResult.MISMATCH
    assert report.differences == (LevelDiff("bid", price, qty + 0.00001, qty),)
    book.apply([(price, qty)], [])

    # A cent inside the ask window where the exchange has no level.
    extra = next(round(a + 0.01, 2) for (a, _), (b, _) in pairwise(asks) if b - a > 0.015)
    book.apply([], [(extra, 0.5)])
    report = audit.compare(book, live_id)
    assert report.differences == (LevelDiff("ask", extra, 0.5, None),)
    assert audit.stale_levels(book) == [("ask", extra)]
    book.apply([], [(extra, 0.0)])

    # Deeper than the snapshot: the exchange may have it, so it is no mismatch.
    deep = round(snapshot.bids[-1][0] - 0.01, 2)
    assert deep not in book.bids
    book.apply([(deep, 9.0)], [])
    assert audit.compare(book, live_id).result is AuditResult.MATCH


def test_real_recording_stale_or_broken_snapshots_are_skipped(recording: Recording) -> None:
    run = LiveRun(recording)
    audit, _ = run.audit(1000, snapshot_after(recording, 990), 1004)
    assert skipped(run.poll(audit)) is SkipReason.SNAPSHOT_TOO_OLD
    # Contiguous with the first buffered event, but Binance's rule refetches when the
    # snapshot's id is below that event's U, and so does the sync the audit reuses.
    audit, _ = run.audit(1500, snapshot_after(recording, 1499), 1504)
    assert skipped(run.poll(audit)) is SkipReason.SNAPSHOT_TOO_OLD

    # An event the live book applied but the shadow never saw.
    while run.next < 2000:
        run.step()
    audit = BookAudit(SYMBOL)
    for i in range(2000, 2006):
        run.step(audit if i != 2003 else None)
    audit.on_snapshot(snapshot_after(recording, 2001))
    assert skipped(run.poll(audit)) is SkipReason.GAP
