"""Frames generated before serving (``--prebuild``), and the books the REST side answers with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from depthflow.simulate.frames import Frame
from depthflow.simulate.market import Market

__all__ = ["Prebuilt"]


@dataclass
class Prebuilt:
    """Frames generated before serving, and a same-seed replica the REST side advances lazily.

    ``items``: (symbol, last update id, frame or None if gap injection swallowed it), in send
    order; ``served_u``: per symbol, the last update id handed to the pump so far.
    """

    items: list[tuple[str, int, Frame | None]] = field(default_factory=list)
    served: dict[str, Market] = field(default_factory=dict)
    served_u: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        markets: dict[str, Market],
        count: int,
        generate: Callable[[str, Market], Frame | None],
        replica_of: Callable[[str], Market],
    ) -> Prebuilt:
        """Advance each of ``markets`` ``count`` events via ``generate``; ``replica_of`` makes a
        same-seed, not yet advanced copy of a symbol's market for the REST side."""
        prebuilt = cls()
        for symbol in markets:
            replica = replica_of(symbol)
            prebuilt.served[symbol] = replica
            prebuilt.served_u[symbol] = replica.last_update_id
        for _ in range(count):
            for symbol, market in markets.items():
                frame = generate(symbol, market)
                prebuilt.items.append((symbol, market.last_update_id, frame))
        return prebuilt

    def snapshot_for(self, symbol: str, limit: int) -> str:
        """``symbol``'s book as of the last frame handed to the pump, as depth snapshot JSON."""
        replica = self.served[symbol]
        target = self.served_u[symbol]
        while replica.last_update_id < target:  # same seed: replays the very same events
            replica.next_event(0)
        return msgspec.json.encode(replica.snapshot(limit)).decode()
