"""The live dashboard: `GET /`, a page made of the package's own files (no CDN: works offline),
fed by `GET /dashboard/stream` (server-sent events); `GET /dashboard/state` is one frame as JSON,
`GET /dashboard/symbols` every symbol for the picker.

One producer task (this router's lifespan) reads the service twice a second into a `Snapshot`,
from memory only (never a database query per frame), and puts it in every client's mailbox,
which holds the latest frame only (`depthflow.live_view`). Each stream turns the snapshot into
its client's frame (its symbols, the chart points it has not had yet) and writes it. A client
that stops reading blocks its own response and nothing else: the producer never waits for it,
its mailbox replaces frames (counted as skipped), and ingestion never sees it.

Shutdown: uvicorn waits for open responses before it runs the app's shutdown, so the streams
must end on their own. The producer watches the uvicorn server's ``should_exit`` and then closes
the hub: every stream ends within a frame interval. (A client that has left megabytes unread
fills the kernel's socket buffer and then uvicorn's; writing to it, or even closing it, waits
for the client. Only the server can abort that connection: uvicorn does so after its
``timeout_graceful_shutdown``.)
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import cache
from importlib.resources import files
from itertools import islice
from typing import Annotated, Any, cast

import msgspec
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from depthflow.live_view import (
    FRAME_INTERVAL_S,
    LADDER_DEPTH,
    Hub,
    Mailbox,
    RateMeter,
    RateTable,
    Snapshot,
    client_frame,
    ladder,
)
from depthflow.service import Service

__all__ = ["Dashboard", "router"]

log = logging.getLogger(__name__)

# Charts one page may show at once: the service may carry 1,500 symbols, a screen a few.
MAX_SYMBOLS = 6
# Shown by default (no choice made): the busiest.
DEFAULT_SYMBOLS = 2
# Busiest symbols offered in every frame; the full list is `GET /dashboard/symbols`.
TOP_SYMBOLS = 12
RECENT_ROWS = 12
_RETRY_MS = 2000
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

SymbolsQuery = Annotated[
    str,
    Query(max_length=400, pattern=r"^[A-Za-z0-9,]*$", description="e.g. btcusdt,ethusdt"),
]


class Dashboard:
    """The producer: samples rates, builds snapshots, publishes them to the hub."""

    def __init__(self, service: Service, server_exiting: Callable[[], bool]) -> None:
        self.service = service
        self.view = service.live_view
        self.hub: Hub[Snapshot] = Hub()
        self._server_exiting = server_exiting
        self._messages = RateMeter()
        self._ticks = RateMeter()
        self._symbol_rates = RateTable()
        self.message_rate = self.tick_rate = 0.0
        self.rates: dict[str, float] = {}
        self._frame = 0
        self._failures = 0

    async def run(self) -> None:
        """Until the server exits (then every stream is ended) or the task is cancelled."""
        while not self._server_exiting():
            self._sample()
            if self.hub.clients:
                self._publish()
            await asyncio.sleep(FRAME_INTERVAL_S)
        self.hub.close()

    def _sample(self) -> None:
        now = time.monotonic()
        metrics = self.service.metrics
        self.message_rate = self._messages.update(now, metrics.messages)
        self.tick_rate = self._ticks.update(now, metrics.ticks)
        self.rates = self._symbol_rates.update(now, self.view.tick_counts())

    def _publish(self) -> None:
        try:
            snapshot = self.snapshot(self.hub.watched())
        except Exception:
            # A bug here must not end the dashboard (nor touch ingestion); log it now and then.
            if self._failures % 120 == 0:
                log.exception("dashboard_frame_failed", extra={"fields": {"n": self._failures}})
            self._failures += 1
            return
        self.hub.publish(snapshot)

    def choose(self, symbols: str) -> list[str]:
        """The configured symbols among ``symbols`` (at most `MAX_SYMBOLS`); the busiest when
        none is named."""
        pipeline = self.service.pipeline
        named = [s.upper() for s in symbols.split(",") if s]
        chosen = [s for s in dict.fromkeys(named) if pipeline.book(s) is not None]
        if not named:
            chosen = [row["symbol"] for row in self._top(DEFAULT_SYMBOLS)]
        return chosen[:MAX_SYMBOLS]

    def snapshot(self, symbols: Iterable[str]) -> Snapshot:
        self._frame += 1
        books = {symbol: self._book(symbol) for symbol in symbols}
        return Snapshot(frame=self._frame, at=time.time(), shared=self._shared(), books=books)

    def symbols(self) -> list[dict[str, Any]]:
        """Every configured symbol, busiest first."""
        return self._top(None)

    def _top(self, n: int | None) -> list[dict[str, Any]]:
        states = self.service.pipeline.states()
        rates, counts = self.rates, self.view.tick_counts()

        def key(symbol: str) -> tuple[float, int]:
            return rates.get(symbol, 0.0), counts.get(symbol, 0)

        if n is None:
            chosen = sorted(states, key=key, reverse=True)
        else:
            chosen = heapq.nlargest(n, states, key=key)
        rows = []
        for symbol in chosen:
            ring = self.view.series(symbol)
            rows.append(
                {
                    "symbol": symbol,
                    "state": states[symbol].value,
                    "rate": rates.get(symbol, 0.0),
                    "ticks": counts.get(symbol, 0),
                    "wap": None if ring is None else ring.last_wap(),
                }
            )
        return rows

    def _book(self, symbol: str) -> dict[str, Any]:
        sync = self.service.pipeline.book(symbol)
        if sync is None:
            return {"symbol": symbol, "state": "unknown", "last_update_id": None}
        bids, asks = sync.book.top(LADDER_DEPTH)
        return {
            "symbol": symbol,
            "state": "catching_up" if sync.catching_up else sync.state.value,
            "last_update_id": sync.last_update_id,
            **ladder(bids, asks),
        }

    def _shared(self) -> dict[str, Any]:
        service, metrics, view = self.service, self.service.metrics, self.view
        checks = service.checks()
        count = metrics.latency_count
        return {
            "service": {
                "uptime_s": time.time() - service.started_at,
                "feed": str(checks["feed"]),
                "database": str(checks["database"]),
                "redis": str(checks["redis"]),
                "connections": len(checks["connections"]),
                "symbols": len(checks["books"]),
                "books": dict(Counter(checks["books"].values())),
                "messages": metrics.messages,
                "ticks": metrics.ticks,
                "message_rate": self.message_rate,
                "tick_rate": self.tick_rate,
                "latency": {
                    "avg": metrics.latency_sum / count if count else 0.0,
                    **metrics.latency_percentiles(),
                },
                "loss": {str(k): v for k, v in metrics.data_loss.most_common()},
                "loss_total": sum(metrics.data_loss.values()),
                "errors": sum(metrics.errors.values()),
                "signals": {str(k): v for k, v in metrics.signals.items()},
                "resyncs": sum(metrics.resyncs.values()),
                "buffered_rows": service.writer.buffered,
                "loop_lag_max": service.loop_lag.recent_max(),
                "sma_short": service.settings.sma_short,
                "sma_long": service.settings.sma_long,
                "clients": self.hub.clients,
                "skipped_frames": self.hub.skipped,
            },
            "top": self._top(TOP_SYMBOLS),
            "gaps": list(islice(view.gaps, RECENT_ROWS)),
            "signals": list(islice(view.signals, RECENT_ROWS)),
        }


def _server_exit_probe() -> Callable[[], bool]:
    """Whether the uvicorn server running us was told to exit.

    uvicorn installs its `Server.handle_exit` as the SIGTERM handler before it starts the app,
    and that sets `should_exit`. Under any other server (or one off the main thread): never,
    and the lifespan's end closes the streams.
    """
    server: Any = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if isinstance(getattr(server, "should_exit", None), bool):
        return lambda: bool(server.should_exit)
    return lambda: False


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    dashboard = Dashboard(app.state.service, _server_exit_probe())
    app.state.dashboard = dashboard
    task = asyncio.create_task(dashboard.run(), name="dashboard")
    try:
        yield
    finally:
        dashboard.hub.close()
        task.cancel()
        await asyncio.wait([task])


router = APIRouter(tags=["dashboard"], lifespan=_lifespan)


async def _dashboard(request: Request) -> Dashboard:
    return cast(Dashboard, request.app.state.dashboard)


DashboardDep = Annotated[Dashboard, Depends(_dashboard)]


@cache
def _asset(name: str) -> bytes:
    # Read on first use: a broken install costs the dashboard, never the service's start.
    return (files("depthflow.api") / "static" / "dashboard" / name).read_bytes()


@router.get("/", response_class=HTMLResponse, summary="The live dashboard")
async def index() -> HTMLResponse:
    return HTMLResponse(_asset("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/assets/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, "no such asset")
    return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/symbols", summary="Every symbol, busiest first (the dashboard's picker)")
async def symbols(dashboard: DashboardDep) -> list[dict[str, Any]]:
    return dashboard.symbols()


@router.get("/dashboard/state", summary="One dashboard frame, with the whole chart history")
async def state(dashboard: DashboardDep, symbols: SymbolsQuery = "") -> Response:
    chosen = dashboard.choose(symbols)
    frame = client_frame(dashboard.snapshot(chosen), dashboard.view, chosen, {})
    return Response(msgspec.json.encode(frame), media_type="application/json")


# Out of the OpenAPI schema: a stream that never ends is no operation to fuzz or try out.
@router.get("/dashboard/stream", include_in_schema=False)
async def stream(request: Request, dashboard: DashboardDep, symbols: SymbolsQuery = "") -> Response:
    """Server-sent events: one `data:` frame (JSON) every `FRAME_INTERVAL_S`."""
    box = dashboard.hub.subscribe(dashboard.choose(symbols))
    # The first frame now, not at the producer's next turn.
    box.put(dashboard.snapshot(box.symbols))
    return _EventStream(request, dashboard, box)


async def _events(
    request: Request, dashboard: Dashboard, box: Mailbox[Snapshot]
) -> AsyncIterator[bytes]:
    cursors: dict[str, int] = {}
    yield f"retry: {_RETRY_MS}\n\n".encode()
    while (snapshot := await box.take()) is not None:
        if await request.is_disconnected():
            return
        frame = client_frame(snapshot, dashboard.view, box.symbols, cursors)
        yield b"data: " + msgspec.json.encode(frame) + b"\n\n"


class _EventStream(StreamingResponse):
    """text/event-stream that leaves the hub however it ends (the stream returns, the client
    disconnects and Starlette cancels it, or the server cancels it)."""

    def __init__(self, request: Request, dashboard: Dashboard, box: Mailbox[Snapshot]) -> None:
        super().__init__(
            _events(request, dashboard, box),
            media_type="text/event-stream",
            headers=_STREAM_HEADERS,
        )
        self._hub = dashboard.hub
        self._box = box

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.unsubscribe(self._box)
