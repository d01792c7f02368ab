"""`orders` rows in PostgreSQL's binary COPY format, encoded from each event's levels at once.

asyncpg's ``copy_records_to_table`` encodes tuple by tuple, about 1 µs a row: the largest single
cost of ingest in py-spy (an event carries 15-50 levels). The rows of one event share its symbol,
time and update id, so a Numba kernel writes them straight from the decoded levels instead, with
no tuple per row at all (`python -m bench writer` measures both; figures in bench/README.md).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt
from numba import njit

from depthflow.records import EventOrders

__all__ = ["encode_orders", "once", "warm_up"]

_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
# Signature, flags (no OIDs), header extension length; the trailer is a field count of -1.
_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER: Final = b"\xff\xff"
# Per row: field count (2), six field lengths (4 each), time and id (8 each), side (3), price and
# quantity (8 each); the symbol's own bytes come on top.
_ROW_FIXED_BYTES: Final = 2 + 6 * 4 + 8 + 8 + 3 + 8 + 8

Int64s = npt.NDArray[np.int64]
Bytes = npt.NDArray[np.uint8]


@njit(nogil=True, cache=True)
def _put_int(out: Bytes, pos: int, value: int, size: int) -> int:
    for b in range(size):
        out[pos + b] = (value >> (8 * (size - 1 - b))) & 0xFF
    return pos + size


@njit(nogil=True, cache=True)
def _encode(
    names: Bytes,
    name_offsets: Int64s,
    events: Int64s,
    levels: Int64s,
    out: Bytes,
) -> int:
    """Write the rows of ``events`` (name index, µs since 2000, update id, bids, asks) with the
    IEEE bits of their ``levels`` (price, quantity; bids then asks, event after event) into
    ``out``; the bytes written."""
    pos = 0
    level = 0
    for e in range(events.shape[0]):
        name = events[e, 0]
        start = name_offsets[name]
        length = name_offsets[name + 1] - start
        bids = events[e, 3]
        for j in range(bids + events[e, 4]):
            pos = _put_int(out, pos, 6, 2)
            pos = _put_int(out, pos, length, 4)
            for c in range(length):
                out[pos + c] = names[start + c]
            pos += length
            pos = _put_int(out, pos, 8, 4)
            pos = _put_int(out, pos, events[e, 1], 8)
            pos = _put_int(out, pos, 8, 4)
            pos = _put_int(out, pos, events[e, 2], 8)
            pos = _put_int(out, pos, 3, 4)
            if j < bids:
                out[pos], out[pos + 1], out[pos + 2] = 98, 105, 100  # "bid"
            else:
                out[pos], out[pos + 1], out[pos + 2] = 97, 115, 107  # "ask"
            pos += 3
            pos = _put_int(out, pos, 8, 4)
            pos = _put_int(out, pos, levels[level, 0], 8)
            pos = _put_int(out, pos, 8, 4)
            pos = _put_int(out, pos, levels[level, 1], 8)
            level += 1
    return pos


def encode_orders(blocks: Sequence[EventOrders]) -> bytes:
    """The COPY payload (header to trailer) of ``blocks``' rows, in ``ORDER_COLUMNS`` order.

    Raises OverflowError for an id or time beyond bigint (asyncpg's error for it too)."""
    index: dict[str, int] = {}
    meta: list[int] = []
    for block in blocks:
        name = index.setdefault(block.symbol, len(index))
        meta += (name, _micros(block.event_time), block.last_update_id)
        meta += (len(block.bids), len(block.asks))
    events = np.array(meta, dtype=np.int64).reshape(len(blocks), 5)
    per_event = events[:, 3] + events[:, 4]
    rows = int(per_event.sum())
    encoded = [name.encode() for name in index]
    lengths = np.array([len(name) for name in encoded], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    names = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
    flat = itertools.chain.from_iterable(
        itertools.chain.from_iterable(itertools.chain(b.bids, b.asks) for b in blocks)
    )
    levels = np.fromiter(flat, dtype=np.float64, count=2 * rows).reshape(rows, 2)
    size = rows * _ROW_FIXED_BYTES + int(per_event @ lengths[events[:, 0]]) if rows else 0
    out = np.empty(size, dtype=np.uint8)
    end = _encode(names, offsets, events, levels.view(np.int64), out)
    return _HEADER + out[:end].tobytes() + _TRAILER


def _micros(moment: datetime) -> int:
    return (moment - _PG_EPOCH) // _MICROSECOND


async def once(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as the async source `copy_to_table` reads (a file object would cost an executor
    hop per read)."""
    yield data


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernel, so no batch waits for the JIT."""
    at = datetime(2024, 1, 1, tzinfo=UTC)
    encode_orders([EventOrders("BTCUSDT", at, 1, [(1.0, 2.0)], [(3.0, 0.0)])])
