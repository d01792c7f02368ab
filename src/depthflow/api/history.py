"""History queries of the stored-row routes: a time range, an order, and a keyset cursor.

A page is ``ORDER BY <time>, id`` (both descending by default) with ``start <= time < end``; the
cursor is the (time, id) of the page's last row, so the next page starts strictly after it and
costs one index descent however deep it is (an OFFSET would re-read every row before it). With a
time range PostgreSQL also prunes the time partitions outside it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import HTTPException, Query
from sqlalchemy import Select, and_, select, tuple_

__all__ = [
    "HistoryParams",
    "decode_cursor",
    "encode_cursor",
    "history_query",
    "next_cursor",
    "page_params",
]

Order = Literal["desc", "asc"]


@dataclass(frozen=True, slots=True)
class HistoryParams:
    start: datetime | None
    end: datetime | None
    order: Order
    after: tuple[datetime, int] | None  # the previous page's last (time, id)
    limit: int

    @property
    def is_history(self) -> bool:
        """Whether the client asked for history (then the answer is a page with `next`)."""
        return self.start is not None or self.end is not None or self.after is not None


def encode_cursor(moment: datetime, row_id: int, order: Order) -> str:
    raw = json.dumps([moment.isoformat(), row_id, order], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, order: Order) -> tuple[datetime, int]:
    """The (time, id) a cursor continues after; ValueError if it is not one of ours or was made
    for the other order."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        moment, row_id, made_for = json.loads(base64.urlsafe_b64decode(padded))
        at = datetime.fromisoformat(moment)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("cursor is not one this API gave out") from None
    if made_for != order or not isinstance(row_id, int) or at.tzinfo is None:
        raise ValueError(f"cursor was made for order={made_for}, not order={order}")
    return at, row_id


def _zoned(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise HTTPException(422, f"{name} needs a time zone (e.g. 2024-08-08T23:00:00Z)")
    return value


def page_params(
    start: Annotated[
        datetime | None, Query(description="Inclusive lower bound on the row's time (ISO-8601)")
    ] = None,
    end: Annotated[
        datetime | None, Query(description="Exclusive upper bound on the row's time (ISO-8601)")
    ] = None,
    order: Annotated[Order, Query(description="By time, then id")] = "desc",
    cursor: Annotated[
        str | None,
        Query(max_length=200, description="`next` of the previous page: the page after it"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Rows to return")] = 100,
) -> HistoryParams:
    """The query parameters every history route shares (a FastAPI dependency)."""
    after = None
    if cursor is not None:
        try:
            after = decode_cursor(cursor, order)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
    start, end = _zoned("start", start), _zoned("end", end)
    if start is not None and end is not None and end <= start:
        raise HTTPException(422, "end must be after start")
    return HistoryParams(start, end, order, after, limit)


def history_query(
    table: Any, time_name: str, symbol: str | None, page: HistoryParams
) -> Select[Any]:
    """``SELECT * FROM table WHERE [symbol] [range] [after cursor] ORDER BY time, id LIMIT n+1``
    (one row more than the page: whether a next page exists)."""
    moment, row_id = table.c[time_name], table.c.id
    conditions = [moment.is_not(None)]
    if symbol:
        conditions.append(table.c.symbol == symbol.upper())
    if page.start is not None:
        conditions.append(moment >= page.start)
    if page.end is not None:
        conditions.append(moment < page.end)
    if page.after is not None:
        keyset, (at, _) = tuple_(moment, row_id), page.after
        after = tuple_(*page.after)
        # The plain bound on the time is implied by the row comparison, but only it lets the
        # planner prune the partitions on the far side of the cursor.
        if page.order == "desc":
            conditions += [moment <= at, keyset < after]
        else:
            conditions += [moment >= at, keyset > after]
    ordering = (moment.desc(), row_id.desc()) if page.order == "desc" else (moment, row_id)
    return select(table).where(and_(*conditions)).order_by(*ordering).limit(page.limit + 1)


def next_cursor(
    rows: list[dict[str, Any]], time_name: str, page: HistoryParams
) -> tuple[list[dict[str, Any]], str | None]:
    """The page's rows (the extra row dropped) and the cursor of the page after, if any."""
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    last = rows[-1]
    return rows, encode_cursor(last[time_name], last["id"], page.order)
