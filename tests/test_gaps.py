"""The gap ledger: stored ticks plus recorded gaps cover the update ids without overlap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from depthflow.accounting import GapReason
from depthflow.gaps import GapLedger

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def store(ledger: GapLedger, first: int, last: int, t: float) -> tuple[object, ...] | None:
    row = ledger.before_tick("BTCUSDT", first, at(t))
    ledger.stored("BTCUSDT", last, at(t))
    return row


def test_contiguous_ticks_record_nothing() -> None:
    ledger = GapLedger()
    assert store(ledger, 10, 12, 0) is None
    assert store(ledger, 13, 20, 1) is None


def test_a_hole_is_recorded_with_the_first_cause_and_the_times_around_it() -> None:
    ledger = GapLedger()
    store(ledger, 10, 12, 0)
    ledger.note("BTCUSDT", GapReason.RECONNECT)
    ledger.note("BTCUSDT", GapReason.GAP)  # a later cause of the same hole
    assert store(ledger, 40, 41, 5) == ("BTCUSDT", 13, 39, at(0), at(5), "reconnect")
    assert store(ledger, 42, 42, 6) is None  # the cause went with its hole


def test_a_refused_tick_leaves_its_ids_to_the_next_hole() -> None:
    ledger = GapLedger()
    store(ledger, 10, 12, 0)
    assert ledger.before_tick("BTCUSDT", 15, at(1)) == ("BTCUSDT", 13, 14, at(0), at(1), "gap")
    ledger.note("BTCUSDT", GapReason.OVERFLOW)  # the writer refused the tick 15..16
    row = store(ledger, 17, 17, 2)
    # 13..14 and 15..16 are two rows that touch, never overlap.
    assert row == ("BTCUSDT", 15, 16, at(1), at(2), "overflow")


def test_ids_going_backwards_are_no_hole() -> None:
    ledger = GapLedger()
    store(ledger, 10, 10**12, 0)
    assert store(ledger, 11, 11, 1) is None
    assert store(ledger, 13, 13, 2) == ("BTCUSDT", 12, 12, at(1), at(2), "gap")


def test_restore_before_the_first_tick_names_the_hole_restart() -> None:
    ledger = GapLedger()
    assert ledger.restore("BTCUSDT", 100, at(-60)) is None
    assert store(ledger, 151, 152, 0) == ("BTCUSDT", 101, 150, at(-60), at(0), "restart")


def test_restore_after_the_first_tick_returns_the_hole_itself() -> None:
    ledger = GapLedger()
    store(ledger, 151, 152, 0)
    store(ledger, 153, 153, 1)
    assert ledger.restore("BTCUSDT", 100, at(-60)) == (
        "BTCUSDT", 101, 150, at(-60), at(0), "restart",
    )  # fmt: skip
    assert ledger.restore("BTCUSDT", 100, at(-60)) is None  # once


def test_restore_of_a_contiguous_earlier_run_records_nothing() -> None:
    ledger = GapLedger()
    assert ledger.restore("BTCUSDT", 150, at(-1)) is None
    assert store(ledger, 151, 152, 0) is None


def test_nothing_stored_before_means_no_restart_hole() -> None:
    ledger = GapLedger()
    store(ledger, 151, 152, 0)
    ledger.forget_first("BTCUSDT")
    assert ledger.restore("BTCUSDT", 100, at(-60)) is None
