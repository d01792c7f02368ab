"""Frame decoding against Binance's documented diff-depth shapes."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest

from depthflow.accounting import LossReason
from depthflow.events import DecodeError, decode_frame, decode_snapshot

# The example event of Binance's "Diff. Depth Stream" documentation, in a combined-stream envelope.
DOC_EVENT: dict[str, Any] = {
    "e": "depthUpdate",
    "E": 1672515782136,
    "s": "BNBBTC",
    "U": 157,
    "u": 160,
    "b": [["0.0024", "10"]],
    "a": [["0.0026", "100"]],
}


def frame(**changes: Any) -> str:
    return json.dumps({"stream": "bnbbtc@depth@100ms", "data": {**DOC_EVENT, **changes}})


def test_documented_event_decodes_with_float_levels() -> None:
    event = decode_frame(frame())
    assert event.symbol == "BNBBTC"
    assert (event.first_update_id, event.last_update_id) == (157, 160)
    assert event.event_time == 1672515782136
    assert event.bids == ((0.0024, 10.0),)
    assert event.asks == ((0.0026, 100.0),)


def test_a_decoded_event_is_nothing_the_cycle_collector_tracks() -> None:
    # Sync buffers hold hundreds of thousands of events while the whole market syncs: a full
    # collection would traverse every tracked one. (Tuples of atoms are untracked by the
    # collections they survive, the inner ones first: two here.)
    event = decode_frame(frame())
    gc.collect()
    gc.collect()
    assert not gc.is_tracked(event)
    assert not any(gc.is_tracked(side) for side in (event.bids, event.asks))


def test_bytes_frames_decode_too() -> None:
    assert decode_frame(frame().encode()).last_update_id == 160


def test_documented_snapshot_decodes() -> None:
    body = '{"lastUpdateId": 1027024, "bids": [["4.00000000", "431.00000000"]], "asks": []}'
    snapshot = decode_snapshot(body)
    assert snapshot.last_update_id == 1027024
    assert snapshot.bids == [(4.0, 431.0)]
    assert snapshot.asks == []


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "",
        "[]",
        frame(b=[["abc", "1"]]),
        frame(b=[["1.0"]]),
        frame(a=[["-1", "1"]]),
        frame(a=[["1", "-0.5"]]),
        frame(a=[["nan", "1"]]),
        frame(a=[["1", "inf"]]),
        frame(U=170),
        frame(E=10**18),
        frame(E=-1),
        frame(U=2**63, u=2**63),
        frame(u="x"),
        json.dumps({"stream": "x", "data": {k: v for k, v in DOC_EVENT.items() if k != "b"}}),
    ],
)
def test_malformed_frames_are_rejected_as_malformed(raw: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_frame(raw)
    assert info.value.kind is LossReason.MALFORMED


@pytest.mark.parametrize(
    "raw",
    [
        frame(e="trade"),
        json.dumps({"stream": "x", "data": {"e": "aggTrade", "p": "1"}}),
        json.dumps({"result": None, "id": 1}),
    ],
)
def test_foreign_events_are_unknown_not_malformed(raw: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_frame(raw)
    assert info.value.kind is LossReason.UNKNOWN_EVENT
