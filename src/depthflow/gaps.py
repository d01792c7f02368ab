"""The gap ledger: every hole in a symbol's stored sequence of update ids gets a ``data_gaps`` row.

No I/O. The pipeline tells the ledger why a hole may open (`note`: a sequence gap, a reconnect, a
resync, a refused write, ...) and asks it, before handing each tick to the writer, whether the
tick leaves update ids uncovered since the last stored one (`before_tick`). An earlier run's last
stored tick (read from the database at start-up, `restore`) turns the hole a crash or restart left
into a row too. So for every symbol, stored ticks plus recorded gaps cover the update-id range from
the first stored tick to the last without overlap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from depthflow.accounting import GapReason
from depthflow.records import GapRow

__all__ = ["GapLedger"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Edge:
    """The last update id known stored (by a tick or a gap row) and its event time."""

    update_id: int
    event_time: datetime | None


class GapLedger:
    """Per-symbol bookkeeping of the stored sequence's edge and the cause of the next hole."""

    def __init__(self) -> None:
        self._edges: dict[str, _Edge] = {}
        self._causes: dict[str, GapReason] = {}
        # This run's first stored tick per symbol while the earlier run's edge is not known yet.
        self._first: dict[str, tuple[int, datetime]] = {}
        self._restored: set[str] = set()
        # This run's first stored tick per symbol (its update id range starts there).
        self._run_first: dict[str, int] = {}

    def note(self, symbol: str, reason: GapReason) -> None:
        """Something happened that leaves update ids unstored; the first cause names the hole."""
        self._causes.setdefault(symbol, reason)

    def before_tick(self, symbol: str, first_update_id: int, event_time: datetime) -> GapRow | None:
        """The row for the hole before a tick starting at ``first_update_id``, if there is one.

        Call it before handing the tick to the writer (its gap row goes first); then call
        `stored` if the writer took the tick, or `note(OVERFLOW)` if it refused it.
        """
        edge = self._edges.get(symbol)
        if edge is None:
            if symbol not in self._restored:
                self._first.setdefault(symbol, (first_update_id, event_time))
            self._causes.pop(symbol, None)
            return None
        reason = self._causes.pop(symbol, GapReason.GAP)
        if first_update_id <= edge.update_id + 1:
            if first_update_id <= edge.update_id:
                # Ids going backwards: an earlier event claimed ids the exchange had not reached
                # (a hostile or corrupt frame). Nothing is missing; the edge follows the new tick.
                log.warning(
                    "sequence_rewound",
                    extra={
                        "fields": {
                            "symbol": symbol,
                            "stored_update_id": edge.update_id,
                            "first_update_id": first_update_id,
                        }
                    },
                )
            return None
        row: GapRow = (
            symbol,
            edge.update_id + 1,
            first_update_id - 1,
            edge.event_time,
            event_time,
            reason.value,
        )
        edge.update_id = first_update_id - 1
        edge.event_time = event_time
        return row

    def close(
        self, symbol: str, last_update_id: int, event_time: datetime, reason: GapReason
    ) -> GapRow | None:
        """Events up to ``last_update_id`` were received but will never be stored (the service
        stops): the row for that hole now, rather than as part of the next run's restart hole."""
        edge = self._edges.get(symbol)
        if edge is None or last_update_id <= edge.update_id:
            return None
        row: GapRow = (
            symbol,
            edge.update_id + 1,
            last_update_id,
            edge.event_time,
            event_time,
            reason.value,
        )
        edge.update_id = last_update_id
        edge.event_time = event_time
        self._causes.pop(symbol, None)
        return row

    def stored(self, symbol: str, last_update_id: int, event_time: datetime) -> None:
        """The writer took a tick ending at ``last_update_id``."""
        if symbol not in self._run_first:
            self._run_first[symbol] = last_update_id
        edge = self._edges.get(symbol)
        if edge is None:
            self._edges[symbol] = _Edge(last_update_id, event_time)
        else:
            edge.update_id = last_update_id
            edge.event_time = event_time

    def run_ranges(self) -> dict[str, tuple[int, int]]:
        """Per symbol, the update ids from this run's first stored tick to the last one stored
        (by a tick or a gap row): what the ``runs`` row says this run wrote."""
        return {
            symbol: (first, self._edges[symbol].update_id)
            for symbol, first in self._run_first.items()
            if symbol in self._edges
        }

    def restore(
        self, symbol: str, last_update_id: int, event_time: datetime | None
    ) -> GapRow | None:
        """The last update id an earlier run stored for ``symbol`` (ticks and gaps).

        Returns the row for the hole between it and this run's first stored tick when that tick
        came first; otherwise the edge is set and the first tick's `before_tick` reports it.
        """
        if symbol in self._restored:
            return None
        self._restored.add(symbol)
        first = self._first.pop(symbol, None)
        if first is None:
            if symbol not in self._edges:
                self._edges[symbol] = _Edge(last_update_id, event_time)
                self._causes[symbol] = GapReason.RESTART
            return None
        first_update_id, first_time = first
        if first_update_id <= last_update_id + 1:
            return None
        return (
            symbol,
            last_update_id + 1,
            first_update_id - 1,
            event_time,
            first_time,
            GapReason.RESTART.value,
        )

    def forget_first(self, symbol: str) -> None:
        """No earlier run to compare with (nothing stored for the symbol)."""
        self._restored.add(symbol)
        self._first.pop(symbol, None)
