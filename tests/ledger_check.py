"""The stored-sequence invariant, checked from the database alone (shared by e2e and fault tests).

For every symbol, the stored ticks ``[first_update_id, last_update_id]`` and the recorded holes
``data_gaps [from_update_id, to_update_id]``, sorted by start, must cover the update-id range from
the first stored one to the last without a hole and without an overlap: each next start is the
previous end + 1.

One exception, allowed only when a test asks for it (``allow_rewound=True``): an event claiming ids
far ahead of the exchange (``u = local + 10**12``) is stored as a tick whose range swallows the ids
of the ticks stored after the book was resynced. Such a later range, starting inside an earlier
one, is "rewound": the sequence then goes on from its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from depthflow.storage.db import asyncpg_dsn

__all__ = ["Coverage", "Span", "assert_sequence_covered", "check_coverage", "load_spans"]


@dataclass(frozen=True, order=True)
class Span:
    """One stored range of update ids: a tick (``kind == "tick"``) or a gap (its reason)."""

    start: int
    end: int
    kind: str
    row_id: int

    def describe(self) -> str:
        what = "tick" if self.kind == "tick" else f"gap({self.kind})"
        return f"{what} id={self.row_id} [{self.start}, {self.end}]"


@dataclass
class Coverage:
    """What `check_coverage` found for one symbol."""

    symbol: str
    spans: int = 0
    ticks: int = 0
    gaps: int = 0
    first: int | None = None
    last: int | None = None
    rewound: list[Span] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_TICKS = """
    SELECT id, symbol, first_update_id, last_update_id FROM price_ticks
    WHERE $1::text IS NULL OR symbol = $1
"""
_GAPS = """
    SELECT id, symbol, from_update_id, to_update_id, reason FROM data_gaps
    WHERE $1::text IS NULL OR symbol = $1
"""


async def load_spans(database_url: str, symbol: str | None = None) -> dict[str, list[Span]]:
    """Every stored tick and gap range, by symbol (upper case), sorted by start."""
    wanted = symbol.upper() if symbol is not None else None
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        ticks = await conn.fetch(_TICKS, wanted)
        gaps = await conn.fetch(_GAPS, wanted)
    finally:
        await conn.close()
    spans: dict[str, list[Span]] = {}
    for row in ticks:
        spans.setdefault(row["symbol"], []).append(
            Span(row["first_update_id"], row["last_update_id"], "tick", row["id"])
        )
    for row in gaps:
        spans.setdefault(row["symbol"], []).append(
            Span(row["from_update_id"], row["to_update_id"], row["reason"], row["id"])
        )
    for items in spans.values():
        # Ties (two rows with one start) put the tick first, then by row id: deterministic.
        items.sort(key=lambda s: (s.start, s.kind != "tick", s.row_id))
    return spans


def check_coverage(symbol: str, spans: list[Span], *, allow_rewound: bool = False) -> Coverage:
    """Walk ``spans`` (sorted by start) and record every hole, overlap and malformed range."""
    result = Coverage(symbol, spans=len(spans))
    result.ticks = sum(1 for s in spans if s.kind == "tick")
    result.gaps = len(spans) - result.ticks
    if not spans:
        return result
    result.first = spans[0].start
    previous: Span | None = None
    reach = -1  # the highest end seen so far
    for span in spans:
        if span.end < span.start:
            result.problems.append(f"{span.describe()} ends before it starts")
        if previous is not None:
            expected = previous.end + 1
            if span.start > expected:
                result.problems.append(
                    f"hole: ids [{expected}, {span.start - 1}] ({span.start - expected} ids) "
                    f"between {previous.describe()} and {span.describe()}"
                )
            elif span.start < expected:
                if allow_rewound and span.kind == "tick" and span.start <= reach:
                    result.rewound.append(span)
                else:
                    result.problems.append(
                        f"overlap: {span.describe()} starts at or before the end of "
                        f"{previous.describe()} (next start should be {expected})"
                    )
        reach = max(reach, span.end)
        previous = span
    result.last = reach
    return result


async def assert_sequence_covered(
    database_url: str, symbol: str | None = None, *, allow_rewound: bool = False
) -> None:
    """Assert the invariant for ``symbol`` (every symbol stored, when None).

    The message names the symbol, the first hole or overlap, and how many problems there were.
    With ``allow_rewound``, a tick starting inside an earlier range is accepted (see module doc).
    """
    spans = await load_spans(database_url, symbol)
    if symbol is not None:
        assert symbol.upper() in spans, f"{symbol.upper()}: nothing stored (no tick, no gap)"
    problems: list[str] = []
    for name in sorted(spans):
        coverage = check_coverage(name, spans[name], allow_rewound=allow_rewound)
        if coverage.ticks == 0:
            problems.append(f"{name}: {coverage.gaps} gap row(s) but no stored tick")
        if coverage.problems:
            more = len(coverage.problems) - 1
            problems.append(
                f"{name}: {coverage.problems[0]}"
                + (f" (and {more} more problem(s))" if more else "")
                + f"; {coverage.ticks} ticks, {coverage.gaps} gaps over"
                f" [{coverage.first}, {coverage.last}]"
            )
    assert not problems, "stored sequence not covered: " + " | ".join(problems)
