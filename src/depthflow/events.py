"""Typed decoding of Binance combined-stream frames.

msgspec decodes the frame straight into structs, turning Binance's decimal strings into floats in
the same pass (``strict=False``), so each price is parsed exactly once.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from depthflow.accounting import LossReason

__all__ = [
    "DecodeError",
    "DepthEvent",
    "Frame",
    "Level",
    "Snapshot",
    "decode_frame",
    "decode_snapshot",
]

# The upper bound rejects "inf" (which strict=False would otherwise accept); "nan" fails both.
_FINITE = 1e15
Price = Annotated[float, msgspec.Meta(gt=0, lt=_FINITE)]
Quantity = Annotated[float, msgspec.Meta(ge=0, lt=_FINITE)]
# Update ids are stored as PostgreSQL bigint; an id beyond it must be rejected here, not by COPY.
UpdateId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Milliseconds up to 9999-12-31, the last instant a Python datetime can hold.
EventTime = Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]
Level = tuple[Price, Quantity]


# gc=False, and levels as tuples (untracked by the first collections they survive): a decoded
# event leaves nothing for the cycle collector to traverse. Sync buffers hold hundreds of
# thousands of events while the whole market syncs, and every full collection traversed each of
# them: 100-150 ms pauses of the loop.
class DepthEvent(msgspec.Struct, frozen=True, gc=False):
    """One diff-depth event (``"e": "depthUpdate"``)."""

    event_type: str = msgspec.field(name="e")
    event_time: EventTime = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    first_update_id: UpdateId = msgspec.field(name="U")
    last_update_id: UpdateId = msgspec.field(name="u")
    bids: tuple[Level, ...] = msgspec.field(name="b")
    asks: tuple[Level, ...] = msgspec.field(name="a")


class Frame(msgspec.Struct, frozen=True, gc=False):
    """A combined-stream envelope: ``{"stream": "btcusdt@depth@100ms", "data": {...}}``."""

    stream: str
    data: DepthEvent


class Snapshot(msgspec.Struct, frozen=True):
    """``GET /api/v3/depth`` response."""

    last_update_id: UpdateId = msgspec.field(name="lastUpdateId")
    bids: list[Level]
    asks: list[Level]


class DecodeError(ValueError):
    """A frame that is not a usable depth event; ``kind`` says whether it was garbage or foreign."""

    def __init__(self, kind: LossReason, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


_frame_decoder = msgspec.json.Decoder(Frame, strict=False)
_snapshot_decoder = msgspec.json.Decoder(Snapshot, strict=False)


def decode_frame(raw: str | bytes) -> DepthEvent:
    """Decode one frame into a `DepthEvent`, or raise `DecodeError` saying why it is unusable."""
    try:
        frame = _frame_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _classify(raw, exc) from None
    except RecursionError:
        # msgspec recurses once per nesting level: a 2 KB frame of 1,000 brackets gets here.
        raise DecodeError(LossReason.MALFORMED, "nested too deeply") from None
    event = frame.data
    if event.event_type != "depthUpdate":
        raise DecodeError(LossReason.UNKNOWN_EVENT, f"event type {event.event_type!r}")
    if event.first_update_id > event.last_update_id:
        raise DecodeError(
            LossReason.MALFORMED,
            f"U={event.first_update_id} > u={event.last_update_id}",
        )
    return event


def decode_snapshot(raw: str | bytes) -> Snapshot:
    """Decode a REST depth snapshot; raises ``msgspec.DecodeError``/``ValidationError`` if bad."""
    return _snapshot_decoder.decode(raw)


def _classify(raw: str | bytes, exc: Exception) -> DecodeError:
    # Only on the error path: a second, untyped look tells a foreign event from garbage.
    try:
        loose = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return DecodeError(LossReason.MALFORMED, f"not JSON: {exc}")
    except RecursionError:
        return DecodeError(LossReason.MALFORMED, "nested too deeply")
    if isinstance(loose, dict):
        data = loose.get("data", loose)
        if isinstance(data, dict) and data.get("e") not in (None, "depthUpdate"):
            return DecodeError(LossReason.UNKNOWN_EVENT, f"event type {data.get('e')!r}")
        if "result" in loose and "id" in loose:
            return DecodeError(LossReason.UNKNOWN_EVENT, "control response")
    return DecodeError(LossReason.MALFORMED, str(exc))
