"""An offline stand-in for Binance: the same websocket and REST paths, fed by seeded markets.

One ``websockets`` server answers both: ``process_request`` (`routes`) serves ``GET /api/v3/depth``
as plain HTTP and lets ``/stream?streams=...`` and ``/ws/<stream>`` through to the websocket
handshake. A single pump task generates events and awaits each send (`connections`), so a slow
client slows the pump (backpressure) instead of the simulator buffering without bound.

Nothing is sent or generated before the first websocket subscriber: a paced market starts its
clock then (so a client that starts slowly misses nothing, and a snapshot taken before it
subscribes is continued by the first event it gets), and from then on moves whether or not anyone
is connected, as an exchange does.

Whole-market runs (``symbols_count``, ``total_rate``): the served symbols are the given ones
followed by generated ``s0001usdt``-style names up to ``symbols_count``; with ``total_rate`` set
they share that many events/s Zipf-like (a few busy symbols, a long tail; `activity`), each at
most one event per ``min_event_gap_s`` (Binance's 100 ms), and their events are shaped like the
real recordings (`shaped`). Without ``total_rate`` every symbol gets ``rate`` events/s in
lockstep, as before.

Binance's rules (`routes`, `weight`): at most ``max_streams_per_connection`` streams a connection,
URLs up to ``max_url_bytes``, REST weight limited per IP (``weight_limit`` a fixed minute, 429
then 418 bans from ``ban_base_s``), and ``GET /api/v3/exchangeInfo`` listing the symbols with
their status (``break_symbols`` start in BREAK; `Simulator.list_symbol`,
`Simulator.set_symbol_status` and `Simulator.delist_symbol` change listings at run time).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import websockets.http11
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosedError
from websockets.http11 import Request, Response

from depthflow.simulate.activity import (
    DEPTH_MIN_GAP_S,
    EventClock,
    generated_symbols,
    symbol_rates,
)
from depthflow.simulate.connections import Connections
from depthflow.simulate.frames import Frame, Replay, load_replay, now_ms
from depthflow.simulate.listings import BREAK, TRADING, Listings
from depthflow.simulate.market import Market, format_e8
from depthflow.simulate.prebuilt import Prebuilt
from depthflow.simulate.routes import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_URL_BYTES,
    Routes,
    parse_subscription,
    process_request,
)
from depthflow.simulate.shaped import ShapedMarket
from depthflow.simulate.weight import (
    DEFAULT_BAN_BASE_S,
    DEFAULT_WEIGHT_LIMIT,
    INTERVAL_S,
    RateLimiter,
    RestStats,
)

__all__ = ["Simulator", "serve"]

logger = logging.getLogger(__name__)

_YIELD_EVERY = 64  # full-speed pumps let handshakes and REST calls in this often
# Bigger than websockets' 32 KiB default: fewer drain() waits when pushing frames at full speed.
_WRITE_LIMIT = 2**20
# A flooded client whose receive buffer is full never reads our close frame (websockets #1555);
# give up on it sooner than the 10 s default so kicks and shutdown stay quick.
_CLOSE_TIMEOUT_S = 2.0
# The scheduled pump wakes at most this often, handling every event due by then.
_SCHEDULE_GRANULARITY_S = 0.004
# websockets drops (no HTTP answer) a request line longer than this; raised so over-long URLs
# reach `process_request` and get Binance's front end's 414.
_HTTP_LINE_LIMIT = 65_536
_SHAPES = ("classic", "recorded")
# Above this many symbols the true WAP history (a dict entry per event) is not kept by default.
_RECORD_WAP_UP_TO = 100


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
        symbols_count: int = 0,
        total_rate: float | None = None,
        zipf_s: float = 1.0,
        min_event_gap_s: float = DEPTH_MIN_GAP_S,
        event_shape: str | None = None,
        record_wap: bool | None = None,
        break_symbols: Sequence[str] = (),
        weight_limit: int | None = DEFAULT_WEIGHT_LIMIT,
        weight_interval_s: float = INTERVAL_S,
        ban_base_s: float = DEFAULT_BAN_BASE_S,
        max_streams_per_connection: int | None = DEFAULT_MAX_STREAMS,
        max_url_bytes: int | None = DEFAULT_MAX_URL_BYTES,
    ) -> None:
        """See the module doc. ``event_shape``: "classic" (`Market`) or "recorded"
        (`ShapedMarket`); None picks "recorded" when ``total_rate`` is set. ``record_wap``: keep
        each market's true WAP per event; None keeps it up to 100 symbols. ``weight_limit``
        None serves every request (weight still reported)."""
        if event_shape is None:
            event_shape = "recorded" if total_rate is not None else "classic"
        if event_shape not in _SHAPES:
            raise ValueError(f"event_shape must be one of {_SHAPES}")
        self._seed = seed
        self._rate = rate
        self._gap_every = gap_every
        self._max_events = max_events
        self._prebuild = prebuild
        self._replay_path = replay
        self._shape = event_shape
        self._min_event_gap_s = min_event_gap_s
        lower = list(dict.fromkeys(symbol.lower() for symbol in symbols))
        if symbols_count > len(lower):
            lower += generated_symbols(symbols_count - len(lower), lower)
        self._record_wap = record_wap if record_wap is not None else len(lower) <= _RECORD_WAP_UP_TO
        self.markets: dict[str, Market] = (
            {} if replay else {symbol: self._new_market(symbol) for symbol in lower}
        )
        self._symbols: set[str] = set(lower)
        self._listings = Listings(
            lower,
            statuses=dict.fromkeys((s.lower() for s in break_symbols), BREAK),
            ticks={s: format_e8(m.tick_e8) for s, m in self.markets.items()},
            weight_limit=weight_limit,
        )
        self._total_rate = total_rate
        self.symbol_rates: dict[str, float] = {}
        if total_rate is not None:
            ranked = symbol_rates(len(lower), total_rate, zipf_s=zipf_s, min_gap_s=min_event_gap_s)
            self.symbol_rates = dict(zip(lower, ranked, strict=True))
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
        self._limiter = RateLimiter(
            weight_limit, interval_s=weight_interval_s, ban_base_s=ban_base_s
        )
        self._max_streams = max_streams_per_connection
        self._routes = Routes(
            symbols=self._symbols,
            snapshot_body=self._snapshot_body,
            exchange_info_body=lambda only: self._listings.body(now_ms(), only),
            limiter=self._limiter,
            max_streams=max_streams_per_connection,
            max_url_bytes=max_url_bytes,
            server_time_ms=now_ms,
        )
        self._active: tuple[tuple[str, Market], ...] = ()
        self._refresh_active()
        self._schedule: list[tuple[float, str]] | None = None
        self._scheduled: set[str] = set()
        self._clock: EventClock | None = None
        self._server: Server | None = None
        self._pump_task: asyncio.Task[None] | None = None

    def _new_market(self, symbol: str) -> Market:
        if self._shape == "recorded":
            return ShapedMarket(symbol, seed=self._seed, record_wap=self._record_wap)
        return Market(symbol, seed=self._seed, record_wap=self._record_wap)

    def _replica(self, symbol: str) -> Market:
        """A same-seed copy without WAP history (the prebuilt REST side's book)."""
        if self._shape == "recorded":
            return ShapedMarket(symbol, seed=self._seed)
        return Market(symbol, seed=self._seed, record_wap=False)

    def _refresh_active(self) -> None:
        """The trading markets, in listing order, as the lockstep pump iterates them."""
        self._active = tuple(
            (symbol, market)
            for symbol, market in self.markets.items()
            if self._listings.trading(symbol)
        )

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

    @property
    def rest_stats(self) -> RestStats:
        """What REST answered: counts per status (200/429/418...), peak weight per interval."""
        return self._limiter.stats

    @property
    def listings(self) -> dict[str, str]:
        """Listed symbol (lower case) -> status, as exchangeInfo reports it."""
        return self._listings.statuses

    # -- listings -------------------------------------------------------------------------------

    def list_symbol(self, symbol: str, status: str = TRADING, *, rate: float | None = None) -> None:
        """List ``symbol`` (a new market, or a delisted one again) with ``status``.

        With ``total_rate``, ``rate`` is its events/s (default: the quietest symbol's)."""
        lower = symbol.lower()
        market = self.markets.get(lower)
        if market is None and self._replay_path is None:
            market = self.markets[lower] = self._new_market(lower)
            self.events_generated[lower] = 0
        tick = format_e8(market.tick_e8) if market is not None else None
        self._listings.set_status(lower, status, tick=tick)
        self._symbols.add(lower)
        if self._total_rate is not None and market is not None:
            if rate is not None or lower not in self.symbol_rates:
                quietest = min(self.symbol_rates.values(), default=1.0)
                self.symbol_rates[lower] = rate if rate is not None else quietest
            self._enqueue(lower)
        self._refresh_active()

    def set_symbol_status(self, symbol: str, status: str) -> None:
        """Change a listed symbol's status; only TRADING ones get events."""
        lower = symbol.lower()
        if lower not in self._symbols:
            raise KeyError(symbol)
        self._listings.set_status(lower, status)
        self._refresh_active()

    def delist_symbol(self, symbol: str) -> None:
        """Stop listing ``symbol``: exchangeInfo drops it, REST and new streams refuse it, and
        its subscribers get no more events (its book is kept should it be listed again)."""
        lower = symbol.lower()
        self._listings.remove(lower)
        self._symbols.discard(lower)
        self._refresh_active()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Prepare prebuilt frames or the recording, listen, start the pump; return the port."""
        if self._replay_path is not None:
            self._replay = await asyncio.to_thread(load_replay, self._replay_path)
            for symbol in sorted(self._replay.symbols - self._symbols):
                self._listings.set_status(symbol, TRADING)
            self._symbols |= self._replay.symbols
        elif self._prebuild > 0:
            self._prebuilt = await asyncio.to_thread(
                Prebuilt.build,
                self.markets,
                self._prebuild,
                self._generate,
                self._replica,
            )
        if websockets.http11.MAX_LINE_LENGTH < _HTTP_LINE_LIMIT:
            websockets.http11.MAX_LINE_LENGTH = _HTTP_LINE_LIMIT
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
            elif self._total_rate is not None:
                await self._pump_scheduled()
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
            for symbol, market in self._active:
                frame = self._generate(symbol, market)
                if frame is not None:
                    await self._connections.broadcast(frame)
            if interval:
                deadline = await self._sleep_until(loop, deadline + interval)
            else:
                await asyncio.sleep(0)

    async def _pump_scheduled(self) -> None:
        """Each symbol at its own ``symbol_rates`` pace (a heap of due times), from the first
        subscriber on; BREAK or delisted symbols keep their turn but generate nothing."""
        loop = asyncio.get_running_loop()
        rng = random.Random(f"{self._seed}:clock")
        self._clock = clock = EventClock(rng, self._min_event_gap_s)
        now = loop.time()
        rates = self.symbol_rates
        heap = self._schedule = [
            (clock.first(now, rate), symbol) for symbol, rate in rates.items() if rate > 0
        ]
        heapq.heapify(heap)
        self._scheduled = {symbol for _, symbol in heap}
        limit = self._max_events
        handled = 0
        while heap:
            due, symbol = heap[0]
            now = loop.time()
            if due > now:
                await asyncio.sleep(max(due - now, _SCHEDULE_GRANULARITY_S))
                continue
            rate = self.symbol_rates.get(symbol, 0.0)
            market = self.markets.get(symbol)
            if (
                market is None
                or rate <= 0
                or (limit is not None and self.events_generated[symbol] >= limit)
            ):
                heapq.heappop(heap)
                self._scheduled.discard(symbol)
                continue
            following = clock.next(due, rate)
            if following < now - 1.0:  # stalled: restart its schedule, no burst
                following = clock.next(now, rate)
            heapq.heapreplace(heap, (following, symbol))
            if self._listings.trading(symbol):
                frame = self._generate(symbol, market)
                if frame is not None:
                    await self._connections.broadcast(frame)
            handled += 1
            if handled % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def _enqueue(self, symbol: str) -> None:
        """Give a symbol listed at run time its turn in a running scheduled pump."""
        heap, clock = self._schedule, self._clock
        if heap is None or clock is None or symbol in self._scheduled:
            return
        rate = self.symbol_rates.get(symbol, 0.0)
        if rate > 0:
            now = asyncio.get_running_loop().time()
            heapq.heappush(heap, (clock.first(now, rate), symbol))
            self._scheduled.add(symbol)

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
        generated = self.events_generated
        return limit is not None and all(generated[symbol] >= limit for symbol, _ in self._active)

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
        subscription = parse_subscription(request.path, self._symbols, self._max_streams)
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
        return process_request(connection, request, self._routes)

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
    **options: Any,
) -> None:
    """Run a `Simulator` until cancelled (the ``depthflow simulate`` command); ``options``: the
    other `Simulator` knobs (``symbols_count``, ``total_rate``, ``weight_limit``, ...)."""
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
        **options,
    )
    bound = await simulator.start(host, port)
    fields: dict[str, Any] = {
        "ws_url": f"ws://{host}:{bound}",
        "rest_url": f"http://{host}:{bound}",
        "symbols": simulator.symbols if len(simulator.symbols) <= 20 else len(simulator.symbols),
        "rate": rate,
        **{key: value for key, value in options.items() if key != "break_symbols"},
        "seed": seed,
        "replay": str(replay) if replay else None,
    }
    logger.info("simulator_listening", extra={"fields": fields})
    try:
        await simulator.serve_forever()
    finally:
        await simulator.stop()
