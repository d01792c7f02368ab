"""Frames generated before serving (``--prebuild``), and the books the REST side answers with."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from depthflow.simulate.frames import Frame
from depthflow.simulate.market import Market

__all__ = ["CHECKPOINT_EVERY", "Prebuilt"]

# Replaying an event costs the REST side ~60 us, and the pump waits meanwhile: without twins, a
# snapshot asked while 5,000 frames were on their way to a full-speed client took 0.3 s.
CHECKPOINT_EVERY = 256


@dataclass
class Prebuilt:
    """Frames generated before serving, and a same-seed replica the REST side advances lazily.

    ``items``: (symbol, last update id, frame or None if gap injection swallowed it), in send
    order; ``served_u``: per symbol, the last update id handed to the pump so far;
    ``checkpoints``: per symbol, twins of the market every `CHECKPOINT_EVERY` events, oldest
    first, so a snapshot never replays more than that many events.
    """

    items: list[tuple[str, int, Frame | None]] = field(default_factory=list)
    served: dict[str, Market] = field(default_factory=dict)
    served_u: dict[str, int] = field(default_factory=dict)
    checkpoints: dict[str, deque[Market]] = field(default_factory=dict)

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
            prebuilt.checkpoints[symbol] = deque()
        for n in range(1, count + 1):
            for symbol, market in markets.items():
                frame = generate(symbol, market)
                prebuilt.items.append((symbol, market.last_update_id, frame))
                if n % CHECKPOINT_EVERY == 0:
                    prebuilt.checkpoints[symbol].append(market.clone())
        return prebuilt

    def snapshot_for(self, symbol: str, limit: int) -> str:
        """``symbol``'s book as of the last frame handed to the pump, as depth snapshot JSON."""
        target = self.served_u[symbol]
        # Jump to the latest twin not past the stream: the stream only moves forward, so older
        # twins are never needed again.
        checkpoints = self.checkpoints.get(symbol, deque())
        while checkpoints and checkpoints[0].last_update_id <= target:
            twin = checkpoints.popleft()
            if twin.last_update_id > self.served[symbol].last_update_id:
                self.served[symbol] = twin
        replica = self.served[symbol]
        while replica.last_update_id < target:  # same seed: replays the very same events
            replica.next_event(0)
        return msgspec.json.encode(replica.snapshot(limit)).decode()
