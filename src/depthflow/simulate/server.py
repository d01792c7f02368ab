"""An offline stand-in for Binance: the same websocket and REST paths, fed by seeded markets.

One ``websockets`` server answers both: ``process_request`` serves ``GET /api/v3/depth`` as plain
HTTP and lets ``/stream?streams=...`` and ``/ws/<stream>`` through to the websocket handshake.
A single pump task generates events and awaits each send, so a slow client slows the pump
(backpressure) instead of the simulator buffering without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.http11 import Request, Response

from depthflow.simulate.frames import Frame, Replay, load_replay, malformed_frame
from depthflow.simulate.market import Market
from depthflow.simulate.routes import (
    BadRequest,
    DepthQuery,
    binance_error,
    json_response,
    parse_depth_query,
    parse_subscription,
)

__all__ = ["Simulator", "serve"]

logger = logging.getLogger(__name__)

_YIELD_EVERY = 64  # full-speed pumps let handshakes and REST calls in this often
_DISCONNECT_CODE = 1001  # "going away", as a server restart would close it
# Bigger than websockets' 32 KiB default: fewer drain() waits when pushing frames at full speed.
_WRITE_LIMIT = 2**20
# A flooded client whose receive buffer is full never reads our close frame (websockets #1555);
# give up on it sooner than the 10 s default so kicks and shutdown stay quick.
_CLOSE_TIMEOUT_S = 2.0


@dataclass(eq=False)
class _Subscriber:
    """One websocket connection and the streams it asked for (symbol -> stream name)."""

    connection: ServerConnection
    combined: bool
    streams: dict[str, str]
    sent: int = 0
    malformed_sent: int = 0
    kicked: bool = False


@dataclass
class _Faults:
    """Fault injection periods; 0 disables each."""

    gap_every: int = 0
    disconnect_every: int = 0
    malformed_every: int = 0


@dataclass
class _Prebuilt:
    """Frames generated before serving, and a same-seed replica the REST side advances lazily."""

    items: list[tuple[str, int, Frame | None]] = field(default_factory=list)
    served: dict[str, Market] = field(default_factory=dict)
    served_u: dict[str, int] = field(default_factory=dict)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Simulator:
    """Serve seeded random-walk books (or a recording) over Binance's paths; see module doc."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int = 1,
        rate: float = 10.0,
        gap_every: int = 0,
        disconnect_every: int = 0,
        malformed_every: int = 0,
        max_events: int | None = None,
        prebuild: int = 0,
        replay: Path | None = None,
    ) -> None:
        self._seed = seed
        self._rate = rate
        self._faults = _Faults(gap_every, disconnect_every, malformed_every)
        self._max_events = max_events
        self._prebuild = prebuild
        self._replay_path = replay
        lower = [symbol.lower() for symbol in symbols]
        self.markets: dict[str, Market] = (
            {} if replay else {symbol: Market(symbol, seed=seed) for symbol in lower}
        )
        self._symbols: set[str] = set(lower)
        self.frames_sent = 0
        self.events_generated: dict[str, int] = dict.fromkeys(self.markets, 0)
        self.done = asyncio.Event()
        self.port: int | None = None
        self._subscribers: set[_Subscriber] = set()
        self._targets: dict[str, tuple[_Subscriber, ...]] = {}
        self._all_targets: tuple[_Subscriber, ...] = ()
        self._has_subscribers = asyncio.Event()
        self._prebuilt: _Prebuilt | None = None
        self._replay: Replay | None = None
        self._replay_sent_u: dict[str, int] = {}
        self._server: Server | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()

    @property
    def symbols(self) -> list[str]:
        """Every symbol served (for a replay: the ones found in the recording too)."""
        return sorted(self._symbols)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Prepare prebuilt frames or the recording, listen, start the pump; return the port."""
        if self._replay_path is not None:
            self._replay = await asyncio.to_thread(load_replay, self._replay_path)
            self._symbols |= self._replay.symbols
        elif self._prebuild > 0:
            self._prebuilt = await asyncio.to_thread(self._build_frames, self._prebuild)
        self._server = await ws_serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            compression=None,  # deflate would cost more CPU per frame than everything else
            write_limit=_WRITE_LIMIT,
            close_timeout=_CLOSE_TIMEOUT_S,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._pump_task = asyncio.create_task(self._pump(), name="simulator-pump")
        return self.port

    async def stop(self) -> None:
        """Stop the pump, close every connection and the listening socket."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
            self._pump_task = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Wait until cancelled; `start` must have been awaited."""
        await asyncio.Event().wait()

    # -- pumps ----------------------------------------------------------------------------------

    async def _pump(self) -> None:
        try:
            if self._replay is not None:
                await self._pump_replay(self._replay)
            elif self._prebuilt is not None:
                await self._pump_prebuilt(self._prebuilt)
            else:
                await self._pump_live()
        except Exception:
            # Nobody awaits the pump until stop(): say so now rather than fall silent.
            logger.exception("simulator_pump_failed")
            raise
        self.done.set()
        logger.info("simulator_done", extra={"fields": {"frames_sent": self.frames_sent}})

    async def _pump_live(self) -> None:
        """Generate ``rate`` events/s per symbol (or as fast as subscribers take them)."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self._rate if self._rate > 0 else 0.0
        deadline = loop.time()
        while not self._exhausted():
            if not interval:
                await self._has_subscribers.wait()
            for symbol, market in self.markets.items():
                frame = self._generate(symbol, market)
                if frame is not None:
                    await self._broadcast(frame)
            if interval:
                deadline = await self._sleep_until(loop, deadline + interval)
            else:
                await asyncio.sleep(0)

    async def _pump_prebuilt(self, prebuilt: _Prebuilt) -> None:
        await self._has_subscribers.wait()
        for index, (symbol, last_update_id, frame) in enumerate(prebuilt.items):
            prebuilt.served_u[symbol] = last_update_id
            if frame is not None:
                await self._broadcast(frame)
            if index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        prebuilt.items = []

    async def _pump_replay(self, replay: Replay) -> None:
        await self._has_subscribers.wait()
        loop = asyncio.get_running_loop()
        per_second = self._rate * max(len(self._symbols), 1)
        interval = 1.0 / per_second if per_second > 0 else 0.0
        deadline = loop.time()
        for index, frame in enumerate(replay.frames):
            if frame.symbol is not None and frame.last_update_id is not None:
                self._replay_sent_u[frame.symbol] = frame.last_update_id
            await self._broadcast(frame)
            if interval:
                deadline = await self._sleep_until(loop, deadline + interval)
            elif index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    @staticmethod
    async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> float:
        """Sleep to an absolute deadline; after a long stall, restart the schedule, no burst."""
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
            return deadline
        await asyncio.sleep(0)
        return loop.time() if delay < -1.0 else deadline

    def _exhausted(self) -> bool:
        limit = self._max_events
        return limit is not None and all(n >= limit for n in self.events_generated.values())

    def _generate(self, symbol: str, market: Market) -> Frame | None:
        """Advance ``market`` one event; ``None`` when gap injection swallows it."""
        event = market.next_event(_now_ms())
        count = self.events_generated[symbol] = self.events_generated[symbol] + 1
        gap_every = self._faults.gap_every
        if gap_every and count % gap_every == 0:
            return None
        return Frame.from_event(symbol, event)

    def _build_frames(self, count: int) -> _Prebuilt:
        prebuilt = _Prebuilt()
        for symbol in self.markets:
            replica = Market(symbol, seed=self._seed, record_wap=False)
            prebuilt.served[symbol] = replica
            prebuilt.served_u[symbol] = replica.last_update_id
        for _ in range(count):
            for symbol, market in self.markets.items():
                frame = self._generate(symbol, market)
                prebuilt.items.append((symbol, market.last_update_id, frame))
        return prebuilt

    # -- sending --------------------------------------------------------------------------------

    async def _broadcast(self, frame: Frame) -> None:
        symbol = frame.symbol
        targets = self._all_targets if symbol is None else self._targets.get(symbol, ())
        for subscriber in targets:
            await self._send(subscriber, frame)

    async def _send(self, subscriber: _Subscriber, frame: Frame) -> None:
        if subscriber.kicked:
            return
        stream = subscriber.streams.get(frame.symbol or "", "") if subscriber.combined else None
        connection = subscriber.connection
        try:
            await connection.send(frame.text(stream))
            subscriber.sent += 1
            self.frames_sent += 1
            every = self._faults.malformed_every
            if every and subscriber.sent % every == 0:
                await connection.send(self._malformed(subscriber, frame, stream))
        except ConnectionClosed:
            self._unsubscribe(subscriber)
            return
        limit = self._faults.disconnect_every
        if limit and subscriber.sent >= limit:
            self._kick(subscriber)

    def _malformed(self, subscriber: _Subscriber, frame: Frame, stream: str | None) -> str:
        symbol = frame.symbol or next(iter(subscriber.streams), "btcusdt")
        kind = subscriber.malformed_sent
        subscriber.malformed_sent += 1
        return malformed_frame(kind, symbol, stream or None, _now_ms())

    def _kick(self, subscriber: _Subscriber) -> None:
        """Close a connection from the server side without blocking the pump on the handshake."""
        subscriber.kicked = True
        self._unsubscribe(subscriber)
        closer = asyncio.create_task(
            subscriber.connection.close(_DISCONNECT_CODE, "simulated disconnect")
        )
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    # -- connections ----------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        if request is None:  # pragma: no cover - websockets always sets it before the handler
            return
        subscription = parse_subscription(request.path, self._symbols)
        subscriber = _Subscriber(connection, subscription.combined, subscription.streams)
        self._subscribe(subscriber)
        try:
            async for message in connection:
                # Binance's SUBSCRIBE/LIST_SUBSCRIPTIONS are out of scope; reading keeps pings and
                # close frames flowing.
                logger.debug("simulator_ignored_message", extra={"fields": {"size": len(message)}})
        except ConnectionClosedError as exc:
            logger.debug("simulator_connection_lost", extra={"fields": {"reason": str(exc)}})
        finally:
            self._unsubscribe(subscriber)

    def _subscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.add(subscriber)
        self._retarget()

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.discard(subscriber)
            self._retarget()

    def _retarget(self) -> None:
        """Rebuild the per-symbol send lists, so the hot path iterates a ready tuple."""
        targets: dict[str, list[_Subscriber]] = {}
        for subscriber in self._subscribers:
            for symbol in subscriber.streams:
                targets.setdefault(symbol, []).append(subscriber)
        self._targets = {symbol: tuple(subs) for symbol, subs in targets.items()}
        self._all_targets = tuple(self._subscribers)
        if self._subscribers:
            self._has_subscribers.set()
        else:
            self._has_subscribers.clear()

    # -- HTTP -----------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/api/v3/depth":
            status, body = self._depth(url.query)
            return json_response(connection, status, body)
        if url.path == "/stream" or url.path.startswith("/ws/"):
            try:
                parse_subscription(request.path, self._symbols)
            except BadRequest as exc:
                return connection.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n")
            return None
        return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")

    def _depth(self, query: str) -> tuple[HTTPStatus, str]:
        """``GET /api/v3/depth``: status and JSON body, errors shaped like Binance's."""
        parsed = parse_depth_query(query, self._symbols)
        if not isinstance(parsed, DepthQuery):
            return parsed
        body = self._snapshot_body(parsed.symbol, parsed.limit)
        if body is None:
            return binance_error(-1121, "Invalid symbol.")
        return HTTPStatus.OK, body

    def _snapshot_body(self, symbol: str, limit: int) -> str | None:
        """The book as of the last frame handed to the pump (not as of the last one generated)."""
        if self._replay is not None:
            return self._replay.snapshot_for(symbol, self._replay_sent_u.get(symbol))
        if self._prebuilt is not None:
            replica = self._prebuilt.served[symbol]
            target = self._prebuilt.served_u[symbol]
            while replica.last_update_id < target:  # same seed: replays the very same events
                replica.next_event(0)
            return msgspec.json.encode(replica.snapshot(limit)).decode()
        return msgspec.json.encode(self.markets[symbol].snapshot(limit)).decode()


async def serve(
    symbols: Sequence[str],
    port: int,
    host: str = "127.0.0.1",
    rate: float = 10.0,
    seed: int = 1,
    gap_every: int = 0,
    disconnect_every: int = 0,
    malformed_every: int = 0,
    max_events: int | None = None,
    prebuild: int = 0,
    replay: Path | None = None,
) -> None:
    """Run a `Simulator` until cancelled (the ``depthflow simulate`` command)."""
    simulator = Simulator(
        symbols,
        seed=seed,
        rate=rate,
        gap_every=gap_every,
        disconnect_every=disconnect_every,
        malformed_every=malformed_every,
        max_events=max_events,
        prebuild=prebuild,
        replay=replay,
    )
    bound = await simulator.start(host, port)
    fields: dict[str, Any] = {
        "ws_url": f"ws://{host}:{bound}",
        "rest_url": f"http://{host}:{bound}",
        "symbols": simulator.symbols,
        "rate": rate,
        "seed": seed,
        "replay": str(replay) if replay else None,
    }
    logger.info("simulator_listening", extra={"fields": fields})
    try:
        await simulator.serve_forever()
    finally:
        await simulator.stop()
