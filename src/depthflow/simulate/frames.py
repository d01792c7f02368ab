"""What the simulator sends: pre-encoded frames, injected malformed frames, loaded recordings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from depthflow.recording import RecordedFrame, read_recording
from depthflow.simulate.market import DepthUpdate

__all__ = [
    "DEFAULT_STREAM_SUFFIX",
    "Frame",
    "Replay",
    "envelope",
    "load_replay",
    "malformed_frame",
    "now_ms",
]

logger = logging.getLogger(__name__)

# The SPEC's default DEPTH_INTERVAL_MS=100 makes this the name nearly every client subscribes to,
# so it is the one envelope encoded ahead of time.
DEFAULT_STREAM_SUFFIX = "@depth@100ms"
MALFORMED_KINDS = 3


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of Binance's event time ``E``."""
    return time.time_ns() // 1_000_000


def envelope(stream: str, data: str) -> str:
    """A combined-stream frame: ``{"stream":"<name>","data":<raw payload>}``.

    Stream names are validated to ``[a-z0-9@]`` before they get here, so no escaping is needed.
    """
    return '{"stream":"' + stream + '","data":' + data + "}"


class Frame:
    """One frame, encoded once; `text` picks the raw or enveloped form a connection needs.

    ``symbol`` is ``None`` for a recorded frame that names no symbol (malformed ones): such a
    frame goes to every connection verbatim.
    """

    __slots__ = ("combined", "data", "last_update_id", "stream", "symbol")

    def __init__(
        self,
        symbol: str | None,
        last_update_id: int | None,
        data: str,
        stream: str | None,
        combined: str,
    ) -> None:
        self.symbol = symbol
        self.last_update_id = last_update_id
        self.data = data
        self.stream = stream
        self.combined = combined

    @classmethod
    def from_event(cls, symbol: str, event: DepthUpdate) -> Frame:
        data = msgspec.json.encode(event).decode()
        stream = symbol + DEFAULT_STREAM_SUFFIX
        return cls(symbol, event["u"], data, stream, envelope(stream, data))

    @classmethod
    def verbatim(cls, raw: str) -> Frame:
        return cls(None, None, raw, None, raw)

    def text(self, stream: str | None) -> str:
        """The frame for a raw connection (``stream`` None) or a combined one named ``stream``."""
        if stream is None:
            return self.data
        if stream == self.stream or self.stream is None:
            return self.combined
        return envelope(stream, self.data)


def malformed_frame(kind: int, symbol: str, stream: str | None, event_time_ms: int) -> str:
    """One of three bad frames, rotating on ``kind``: not JSON, wrong types, unknown event."""
    upper = symbol.upper()
    rotation = kind % MALFORMED_KINDS
    if rotation == 0:
        data = '{"e":"depthUpdate","E":' + str(event_time_ms) + ',"s":"' + upper + '","U":'
    elif rotation == 1:
        # Ids 0 make it stale even for a client lenient enough to parse it.
        data = msgspec.json.encode(
            {"e": "depthUpdate", "E": event_time_ms, "s": upper, "U": 0, "u": 0,
             "b": [["abc", "1.00000000"]], "a": []}
        ).decode()  # fmt: skip
    else:
        data = msgspec.json.encode(
            {"e": "trade", "E": event_time_ms, "s": upper, "t": 1, "p": "1.0", "q": "1.0"}
        ).decode()
    return data if stream is None else envelope(stream, data)


@dataclass
class Replay:
    """A recording ready to serve: frames in order, snapshots per symbol in recorded order."""

    frames: list[Frame] = field(default_factory=list)
    snapshots: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    @property
    def symbols(self) -> set[str]:
        found = {frame.symbol for frame in self.frames if frame.symbol is not None}
        return found | set(self.snapshots)

    def snapshot_for(self, symbol: str, last_sent_u: int | None) -> str | None:
        """The latest recorded snapshot with ``lastUpdateId <= last_sent_u``, else the first."""
        recorded = self.snapshots.get(symbol)
        if not recorded:
            return None
        chosen = recorded[0][1]
        if last_sent_u is not None:
            for last_update_id, body in recorded:
                if last_update_id <= last_sent_u:
                    chosen = body
        return chosen


def load_replay(path: Path) -> Replay:
    """Read a recording into memory; raises `RecordingError` on a bad line."""
    replay = Replay()
    for item in read_recording(path):
        if isinstance(item, RecordedFrame):
            replay.frames.append(_recorded_frame(item.raw))
            continue
        last_update_id = _snapshot_id(item.raw)
        if last_update_id is None:
            logger.warning("replay_snapshot_skipped", extra={"fields": {"symbol": item.symbol}})
            continue
        replay.snapshots.setdefault(item.symbol, []).append((last_update_id, item.raw))
    return replay


def _loose(raw: str) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None


def _recorded_frame(raw: str) -> Frame:
    """Classify a recorded frame by symbol so it reaches that symbol's subscribers only."""
    loose = _loose(raw)
    if not isinstance(loose, dict):
        return Frame.verbatim(raw)
    data = loose.get("data")
    if isinstance(data, dict) and isinstance(loose.get("stream"), str):
        symbol = _event_symbol(data) or loose["stream"].split("@", 1)[0].lower()
        data_text = msgspec.json.encode(data).decode()
        return Frame(symbol, _event_id(data), data_text, loose["stream"], raw)
    symbol = _event_symbol(loose)
    if symbol is None:
        return Frame.verbatim(raw)
    stream = symbol + DEFAULT_STREAM_SUFFIX
    return Frame(symbol, _event_id(loose), raw, stream, envelope(stream, raw))


def _event_symbol(data: dict[str, Any]) -> str | None:
    symbol = data.get("s")
    return symbol.lower() if isinstance(symbol, str) and symbol else None


def _event_id(data: dict[str, Any]) -> int | None:
    last = data.get("u")
    return last if isinstance(last, int) and not isinstance(last, bool) else None


def _snapshot_id(raw: str) -> int | None:
    loose = _loose(raw)
    if isinstance(loose, dict):
        last = loose.get("lastUpdateId")
        if isinstance(last, int) and not isinstance(last, bool):
            return last
    return None
