"""Combined-stream depth frames built by hand, as Binance sends them."""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["STREAM_SUFFIX", "depth_frame", "envelope"]

STREAM_SUFFIX = "@depth@100ms"
EVENT_TIME_MS = 1_700_000_000_000

Levels = Iterable[tuple[float | str, float | str]]


def envelope(stream: str, data: str) -> str:
    """A combined-stream frame around a raw JSON payload."""
    return '{"stream":' + json.dumps(stream) + ',"data":' + data + "}"


def depth_frame(
    U: int,
    u: int,
    b: Levels = (),
    a: Levels = (),
    s: str = "BTCUSDT",
    E: int = EVENT_TIME_MS,
) -> str:
    """A ``depthUpdate`` of symbol ``s`` in its combined-stream envelope; the arguments are
    Binance's field names, levels are (price, quantity) pairs rendered with `str`."""
    data = {
        "e": "depthUpdate",
        "E": E,
        "s": s,
        "U": U,
        "u": u,
        "b": [[str(p), str(q)] for p, q in b],
        "a": [[str(p), str(q)] for p, q in a],
    }
    return envelope(s.lower() + STREAM_SUFFIX, json.dumps(data))
