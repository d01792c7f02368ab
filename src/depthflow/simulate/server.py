"""An offline stand-in for Binance: the same websocket and REST paths, fed by seeded markets.

One ``websockets`` server answers both: ``process_request`` (`routes`) serves ``GET /api/v3/depth``
as plain HTTP and lets ``/stream?streams=...`` and ``/ws/<stream>`` through to the websocket
handshake. A single pump task generates events and awaits each send (`connections`), so a slow
client slows the pump (backpressure) instead of the simulator buffering without bound.

Nothing is sent or generated before the first websocket subscriber: a paced market starts its
clock then (so a client that starts slowly misses nothing, and a snapshot taken before it
subscribes is continued by the first event it gets), and from then on moves whether or not anyone
is connected, as an exchange does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosedError
from websockets.http11 import Request, Response

from depthflow.simulate.connections import Connections
from depthflow.simulate.frames import Frame, Replay, load_replay, now_ms
from depthflow.simulate.market import Market
from depthflow.simulate.prebuilt import Prebuilt
from depthflow.simulate.routes import parse_subscription, process_request
from depthflow.simulate.weight import UsedWeight

__all__ = ["Simulator", "serve"]

logger = logging.getLogger(__name__)

_YIELD_EVERY = 64  # full-speed pumps let handshakes and REST calls in this often
# Bigger than websockets' 32 KiB default: fewer drain() waits when pushing frames at full speed.
_WRITE_LIMIT = 2**20
# A flooded client whose receive buffer is full never reads our close frame (websockets #1555);
# give up on it sooner than the 10 s default so kicks and shutdown stay quick.
_CLOSE_TIMEOUT_S = 2.0


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
        self._gap_every = gap_every
        self._max_events = max_events
        self._prebuild = prebuild
        self._replay_path = replay
        lower = [symbol.lower() for symbol in symbols]
        self.markets: dict[str, Market] = (
            {} if replay else {symbol: Market(symbol, seed=seed) for symbol in lower}
        )
        self._symbols: set[str] = set(lower)
        self.events_generated: dict[str, int] = dict.fromkeys(self.markets, 0)
        self.started = asyncio.Event()  # set when the first subscriber starts the pump
        self.done = asyncio.Event()
        self.port: int | None = None
        self._connections = Connections(
            disconnect_every=disconnect_every, malformed_every=malformed_every
        )
        self._prebuilt: Prebuilt | None = None
        self._replay: Replay | None = None
        self._replay_sent_u: dict[str, int] = {}
        self._used_weight = UsedWeight()
        self._server: Server | None = None
        self._pump_task: asyncio.Task[None] | None = None

    @property
    def symbols(self) -> list[str]:
        """Every symbol served (for a replay: the ones found in the recording too)."""
        return sorted(self._symbols)

    @property
    def frames_sent(self) -> int:
        """Frames sent to subscribers so far (injected malformed ones not counted)."""
        return self._connections.frames_sent

    @property
    def malformed_sent(self) -> int:
        """Injected malformed frames sent so far (``malformed_every``)."""
        return self._connections.malformed_sent

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Prepare prebuilt frames or the recording, listen, start the pump; return the port."""
        if self._replay_path is not None:
            self._replay = await asyncio.to_thread(load_replay, self._replay_path)
            self._symbols |= self._replay.symbols
        elif self._prebuild > 0:
            self._prebuilt = await asyncio.to_thread(
                Prebuilt.build, self.markets, self._seed, self._prebuild, self._generate
            )
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
        await self._connections.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until cancelled; `start` must have been awaited."""
        await asyncio.Event().wait()

    # -- pumps ----------------------------------------------------------------------------------

    async def _pump(self) -> None:
        await self._connections.wait_for_subscriber()
        self.started.set()
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
        """Generate ``rate`` events/s per symbol (or, at rate 0, as fast as subscribers take them
        and only while one is connected), from the first subscriber on."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self._rate if self._rate > 0 else 0.0
        deadline = loop.time()
        while not self._exhausted():
            if not interval:
                await self._connections.wait_for_subscriber()
            for symbol, market in self.markets.items():
                frame = self._generate(symbol, market)
                if frame is not None:
                    await self._connections.broadcast(frame)
            if interval:
                deadline = await self._sleep_until(loop, deadline + interval)
            else:
                await asyncio.sleep(0)

    async def _pump_prebuilt(self, prebuilt: Prebuilt) -> None:
        for index, (symbol, last_update_id, frame) in enumerate(prebuilt.items):
            prebuilt.served_u[symbol] = last_update_id
            if frame is not None:
                await self._connections.broadcast(frame)
            if index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        prebuilt.items = []

    async def _pump_replay(self, replay: Replay) -> None:
        loop = asyncio.get_running_loop()
        per_second = self._rate * max(len(self._symbols), 1)
        interval = 1.0 / per_second if per_second > 0 else 0.0
        deadline = loop.time()
        for index, frame in enumerate(replay.frames):
            if frame.symbol is not None and frame.last_update_id is not None:
                self._replay_sent_u[frame.symbol] = frame.last_update_id
            await self._connections.broadcast(frame)
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
        event = market.next_event(now_ms())
        count = self.events_generated[symbol] = self.events_generated[symbol] + 1
        gap_every = self._gap_every
        if gap_every and count % gap_every == 0:
            return None
        return Frame.from_event(symbol, event)

    # -- connections ----------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        if request is None:  # pragma: no cover - websockets always sets it before the handler
            return
        subscription = parse_subscription(request.path, self._symbols)
        subscriber = self._connections.add(connection, subscription)
        try:
            async for message in connection:
                # Binance's SUBSCRIBE/LIST_SUBSCRIPTIONS are out of scope; reading keeps pings and
                # close frames flowing.
                logger.debug("simulator_ignored_message", extra={"fields": {"size": len(message)}})
        except ConnectionClosedError as exc:
            logger.debug("simulator_connection_lost", extra={"fields": {"reason": str(exc)}})
        finally:
            self._connections.discard(subscriber)

    # -- HTTP -----------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return process_request(
            connection, request, self._symbols, self._snapshot_body, self._used_weight
        )

    def _snapshot_body(self, symbol: str, limit: int) -> str | None:
        """The book as of the last frame handed to the pump (not as of the last one generated)."""
        if self._replay is not None:
            return self._replay.snapshot_for(symbol, self._replay_sent_u.get(symbol))
        if self._prebuilt is not None:
            return self._prebuilt.snapshot_for(symbol, limit)
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
