"""A scriptable, hostile Binance stand-in: the test decides every frame and every snapshot answer.

One ``websockets`` server on one port, like the simulator: ``process_request`` answers
``GET /api/v3/depth`` as plain HTTP and lets ``/stream?streams=...`` through to the websocket
handshake. Nothing is sent by itself:

* `ScriptedBook` is the exchange's book of one symbol. `ScriptedBook.event`, `random_event` and
  `real_shaped` change it and return a self-consistent `Event` (``U`` = previous ``u`` + 1) with
  the level-1 WAP the book has after it, so a test can check every stored tick; `forged` makes an
  event that does not touch the book (ids far ahead, a replay, ...). Making an event does not
  send it.
* Each websocket connection is an `ExchangeConnection` with a queue: `send` frames (any text or
  bytes, valid or not) and `drop` it (a close frame after what was queued) or `abort` it (TCP reset,
  no close frame), in order.
* `HostileExchange.script_snapshot` queues how the next snapshot requests of a symbol are answered
  (`SnapshotReply`: body, status, delay, a body trickled one byte every N s); once the queue is
  empty the book's current snapshot is served at once. `refuse_streams` makes new websocket
  connections fail with a 503 until cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.harness.frames import STREAM_SUFFIX, envelope

__all__ = [
    "Event",
    "ExchangeConnection",
    "HostileExchange",
    "ScriptedBook",
    "SnapshotReply",
    "SnapshotServed",
    "envelope",
    "nested",
    "real_shaped",
    "wap",
]

# Prices in cents, quantities in thousandths: exact in the test, rendered as Binance's strings.
PRICE_SCALE = 100
QTY_SCALE = 1000


def wap(bid_px: float, bid_qty: float, ask_px: float, ask_qty: float) -> float:
    """Level-1 WAP, the very expression the service stores (so floats compare exactly)."""
    return (bid_px * ask_qty + ask_px * bid_qty) / (bid_qty + ask_qty)


def price_text(cents: int) -> str:
    return f"{cents // PRICE_SCALE}.{cents % PRICE_SCALE:02d}"


def qty_text(units: int) -> str:
    return f"{units // QTY_SCALE}.{units % QTY_SCALE:03d}"


def nested(depth: int, inner: str = "") -> str:
    """``[[[...]]]`` nested ``depth`` levels deep."""
    return "[" * depth + inner + "]" * depth


LevelChanges = Mapping[int, int]  # price in cents -> quantity in thousandths (0 removes)


@dataclass(frozen=True)
class Event:
    """One depth event as sent: ids, payload, and the WAP of the exchange's book after it."""

    symbol: str
    first_update_id: int
    last_update_id: int
    data: str  # the ``data`` JSON object
    wap: float | None  # None when a side is empty (no tick expected)

    @property
    def frame(self) -> str:
        """The combined-stream frame (what depthflow subscribes to)."""
        return envelope(self.symbol + STREAM_SUFFIX, self.data)


class ScriptedBook:
    """The exchange's order book of one symbol; makes events that keep it self-consistent."""

    def __init__(
        self,
        symbol: str,
        *,
        last_update_id: int = 1000,
        mid_cents: int = 10_000,
        levels: int = 5,
        seed: int = 1,
    ) -> None:
        self.symbol = symbol.lower()
        self.last_update_id = last_update_id
        self.mid = mid_cents
        self.bids: dict[int, int] = {mid_cents - i: 1000 * i for i in range(1, levels + 1)}
        self.asks: dict[int, int] = {mid_cents + i: 1000 * i for i in range(1, levels + 1)}
        self._rng = random.Random(seed)
        self._levels = levels
        # The WAP after every event made (forged ones included), by its last update id.
        self.expected_wap: dict[int, float | None] = {}
        self.events: list[Event] = []

    # -- reading -----------------------------------------------------------------------------------

    def best(self) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        bid = max(self.bids) if self.bids else None
        ask = min(self.asks) if self.asks else None
        return (
            None if bid is None else (float(price_text(bid)), float(qty_text(self.bids[bid]))),
            None if ask is None else (float(price_text(ask)), float(qty_text(self.asks[ask]))),
        )

    def wap(self) -> float | None:
        bid, ask = self.best()
        if bid is None or ask is None or bid[0] >= ask[0]:
            return None
        return wap(bid[0], bid[1], ask[0], ask[1])

    def top(self, depth: int) -> tuple[list[list[float]], list[list[float]]]:
        """Up to ``depth`` levels a side as floats, best first (what ``/book`` returns)."""
        bids = sorted(self.bids, reverse=True)[:depth]
        asks = sorted(self.asks)[:depth]
        return (
            [[float(price_text(p)), float(qty_text(self.bids[p]))] for p in bids],
            [[float(price_text(p)), float(qty_text(self.asks[p]))] for p in asks],
        )

    def snapshot(self, limit: int = 1000) -> str:
        """``GET /api/v3/depth`` body of the book as it is now."""
        return json.dumps(
            {
                "lastUpdateId": self.last_update_id,
                "bids": [
                    [price_text(p), qty_text(self.bids[p])]
                    for p in sorted(self.bids, reverse=True)[:limit]
                ],
                "asks": [
                    [price_text(p), qty_text(self.asks[p])] for p in sorted(self.asks)[:limit]
                ],
            }
        )

    # -- making events ----------------------------------------------------------------------------

    def event(
        self,
        bids: LevelChanges | None = None,
        asks: LevelChanges | None = None,
        *,
        span: int = 1,
        event_time_ms: int | None = None,
    ) -> Event:
        """Apply level changes to the book as one event covering ``span`` update ids."""
        if span < 1:
            raise ValueError("an event covers at least one update id")
        bids, asks = bids or {}, asks or {}
        first = self.last_update_id + 1
        last = self.last_update_id + span
        for side, changes in ((self.bids, bids), (self.asks, asks)):
            for price, qty in changes.items():
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)
        self.last_update_id = last
        return self._record(first, last, bids, asks, self.wap(), event_time_ms)

    def random_event(self, *, span: int = 1) -> Event:
        """A plausible event: one or two levels change; the book never crosses nor empties."""
        rng = self._rng
        bids: dict[int, int] = {}
        asks: dict[int, int] = {}
        for _ in range(rng.randint(1, 2)):
            side, changes, sign = (
                (self.bids, bids, -1) if rng.random() < 0.5 else (self.asks, asks, 1)
            )
            price = self.mid + sign * rng.randint(1, self._levels + 2)
            if price in side and len(side) > 1 and rng.random() < 0.3:
                changes[price] = 0
            else:
                changes[price] = rng.randint(1, 5000)
        return self.event(bids, asks, span=span)

    def forged(
        self,
        first_update_id: int,
        last_update_id: int,
        bids: LevelChanges | None = None,
        asks: LevelChanges | None = None,
        *,
        expected_wap: float | None = None,
    ) -> Event:
        """An event with any ids that leaves the exchange's book alone (a hostile or corrupt one).

        Its expected WAP is the book's current one unless given: right when it carries no levels
        and the receiving book equals this one.
        """
        return self._record(
            first_update_id,
            last_update_id,
            bids or {},
            asks or {},
            expected_wap if expected_wap is not None else self.wap(),
            None,
        )

    def skip(self, n: int) -> None:
        """Events the exchange makes but nobody receives: ``n`` random ones, never sent."""
        for _ in range(n):
            self.random_event()

    def _record(
        self,
        first: int,
        last: int,
        bids: LevelChanges,
        asks: LevelChanges,
        expected: float | None,
        event_time_ms: int | None,
    ) -> Event:
        data = json.dumps(
            {
                "e": "depthUpdate",
                "E": event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000,
                "s": self.symbol.upper(),
                "U": first,
                "u": last,
                "b": [[price_text(p), qty_text(q)] for p, q in sorted(bids.items())],
                "a": [[price_text(p), qty_text(q)] for p, q in sorted(asks.items())],
            },
            separators=(",", ":"),
        )
        event = Event(self.symbol, first, last, data, expected)
        self.expected_wap[last] = expected
        self.events.append(event)
        return event


def real_shaped(book: ScriptedBook, rng: random.Random, levels: int = 20) -> Event:
    """An event like Binance's busy ones: about ``levels`` level changes within 60 ticks of the
    mid, an update-id span of 1-30; never crosses nor empties the book (the touch is set)."""
    bids: dict[int, int] = {}
    asks: dict[int, int] = {}
    for _ in range(levels):
        if rng.random() < 0.5:
            bids[book.mid - rng.randint(1, 60)] = rng.randint(0 if len(book.bids) > 10 else 1, 5000)
        else:
            asks[book.mid + rng.randint(1, 60)] = rng.randint(0 if len(book.asks) > 10 else 1, 5000)
    bids[book.mid - 1] = rng.randint(1, 5000)
    asks[book.mid + 1] = rng.randint(1, 5000)
    return book.event(bids, asks, span=rng.randint(1, 30))


@dataclass(frozen=True)
class SnapshotReply:
    """How one snapshot request is answered.

    ``body`` None: the book's snapshot as of the moment the answer starts (after ``delay_s``).
    ``trickle_s``: send the headers at once, then the body one byte every ``trickle_s`` seconds,
    until it is all sent or the client hangs up. ``gate``: answer only once the test sets it.
    """

    status: int = 200
    body: str | None = None
    delay_s: float = 0.0
    trickle_s: float | None = None
    gate: asyncio.Event | None = None


@dataclass
class SnapshotServed:
    """One snapshot request as the exchange saw it (monotonic times)."""

    symbol: str
    reply: SnapshotReply
    requested_at: float
    body: str = ""
    bytes_sent: int = 0
    finished_at: float | None = None
    client_gone: bool = False  # the client hung up before the whole body was sent


@dataclass(eq=False)
class ExchangeConnection:
    """One websocket connection; frames and closes go out in the order they are queued."""

    number: int  # 1 for the first connection of the exchange, 2 for the next, ...
    websocket: ServerConnection
    streams: tuple[str, ...]
    sent: int = 0  # frames handed to the socket
    sent_frames: list[str | bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _queue: asyncio.Queue[str | bytes | tuple[int, str]] = field(default_factory=asyncio.Queue)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def open(self) -> bool:
        return not self.closed.is_set()

    def send(self, *frames: str | bytes | Event) -> None:
        """Queue frames (an `Event` is sent as its combined-stream frame)."""
        for frame in frames:
            self._idle.clear()
            self._queue.put_nowait(frame.frame if isinstance(frame, Event) else frame)

    def drop(self, code: int = 1001, reason: str = "going away") -> None:
        """Queue a close handshake after the frames queued so far."""
        self._idle.clear()
        self._queue.put_nowait((code, reason))

    def abort(self) -> None:
        """Cut the TCP connection now, without a close frame (frames still queued are lost)."""
        self.websocket.transport.abort()

    async def drain(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (a test helper)
        """Wait until everything queued has been handed to the socket (or the connection ended)."""
        async with asyncio.timeout(timeout):
            while not self._idle.is_set() and not self.closed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._idle.wait()

    async def wait_closed(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            await self.closed.wait()

    async def _pump(self) -> None:
        ws = self.websocket
        while True:
            if self._queue.empty():
                self._idle.set()
            item = await self._queue.get()
            if isinstance(item, tuple):
                await ws.close(item[0], item[1])
                return
            await ws.send(item)
            self.sent += 1
            self.sent_frames.append(item)


class HostileExchange:
    """Serves the books of ``symbols``; see the module doc."""

    def __init__(self, symbols: Iterable[str], *, seed: int = 1) -> None:
        self.books: dict[str, ScriptedBook] = {
            s.lower(): ScriptedBook(s, last_update_id=1000 * (i + 1), seed=seed + i)
            for i, s in enumerate(symbols)
        }
        self.connections: list[ExchangeConnection] = []
        self.snapshots: list[SnapshotServed] = []
        self.refuse_streams = False
        self.refused = 0
        self.port: int | None = None
        self._replies: dict[str, deque[SnapshotReply]] = {s: deque() for s in self.books}
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            compression=None,
            open_timeout=None,  # a delayed or trickled snapshot is part of the "handshake"
            close_timeout=2,
            ping_interval=None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HostileExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- websocket side ----------------------------------------------------------------------------

    @property
    def current(self) -> ExchangeConnection:
        """The newest connection (whether it is still open or not)."""
        if not self.connections:
            raise LookupError("no websocket connection yet")
        return self.connections[-1]

    def send(self, *frames: str | bytes | Event) -> None:
        """Queue frames on the newest connection."""
        self.current.send(*frames)

    @property
    def frames_sent(self) -> int:
        """Frames handed to sockets over every connection so far."""
        return sum(c.sent for c in self.connections)

    async def connection(self, number: int, timeout: float = 30.0) -> ExchangeConnection:  # noqa: ASYNC109
        """The ``number``-th connection (1-based), once it is open."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.connections) >= number)
        return self.connections[number - 1]

    async def _handle(self, websocket: ServerConnection) -> None:
        request = websocket.request
        assert request is not None
        streams = tuple(_requested_streams(request.path))
        conn = ExchangeConnection(len(self.connections) + 1, websocket, streams)
        async with self._changed:
            self.connections.append(conn)
            self._changed.notify_all()
        pump = asyncio.create_task(conn._pump(), name=f"hostile-exchange-pump-{conn.number}")
        try:
            # Reading keeps close frames flowing; whatever the client says is ignored.
            with contextlib.suppress(ConnectionClosed):
                async for _ in websocket:
                    pass
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            conn.closed.set()
            conn._idle.set()

    # -- REST side ---------------------------------------------------------------------------------

    def script_snapshot(self, symbol: str, *replies: SnapshotReply) -> None:
        """Answer the next snapshot requests of ``symbol`` with ``replies``, in order."""
        self._replies[symbol.lower()].extend(replies)

    def snapshots_of(self, symbol: str) -> list[SnapshotServed]:
        return [s for s in self.snapshots if s.symbol == symbol.lower()]

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/api/v3/depth":
            return await self._depth(connection, url.query)
        if url.path == "/stream":
            streams = _requested_streams(request.path)
            unknown = [s for s in streams if s.split("@", 1)[0] not in self.books]
            if not streams or unknown:
                return connection.respond(HTTPStatus.BAD_REQUEST, f"bad streams {unknown}\n")
            if self.refuse_streams:
                self.refused += 1
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "refused\n")
            return None
        return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")

    async def _depth(self, connection: ServerConnection, query: str) -> Response | None:
        params = parse_qs(query)
        symbol = (params.get("symbol") or [""])[0].lower()
        limit = int((params.get("limit") or ["1000"])[0])
        book = self.books.get(symbol)
        if book is None:
            return _json(
                connection, HTTPStatus.BAD_REQUEST, '{"code":-1121,"msg":"Invalid symbol."}'
            )
        queue = self._replies[symbol]
        reply = queue.popleft() if queue else SnapshotReply()
        served = SnapshotServed(symbol, reply, time.monotonic())
        self.snapshots.append(served)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.gate is not None:
            await reply.gate.wait()
        body = reply.body if reply.body is not None else book.snapshot(limit)
        served.body = body
        if reply.trickle_s is None:
            served.bytes_sent = len(body.encode())
            served.finished_at = time.monotonic()
            return _json(connection, HTTPStatus(reply.status), body)
        await self._trickle(connection, served, body.encode(), reply.status, reply.trickle_s)
        # The socket is closed by now: websockets sends nothing more on it.
        return _json(connection, HTTPStatus(reply.status), body)

    @staticmethod
    async def _trickle(
        connection: ServerConnection, served: SnapshotServed, body: bytes, status: int, every: float
    ) -> None:
        """Write the HTTP answer by hand: headers now, then one body byte every ``every`` s."""
        transport = connection.transport
        phrase = HTTPStatus(status).phrase
        transport.write(
            (
                f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        for index in range(len(body)):
            await asyncio.sleep(every)
            if transport.is_closing():
                served.client_gone = True
                break
            transport.write(body[index : index + 1])
            served.bytes_sent += 1
        served.finished_at = time.monotonic()
        # No websocket handshake follows: close the socket and let websockets give up on it.
        transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(connection.connection_lost_waiter), 5)


def _requested_streams(path: str) -> list[str]:
    query = parse_qs(urlsplit(path).query).get("streams", [])
    return [name.lower() for value in query for name in value.split("/") if name]


def _json(connection: ServerConnection, status: HTTPStatus, body: str) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json;charset=UTF-8"
    return response
