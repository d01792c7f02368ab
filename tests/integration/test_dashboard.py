"""The live dashboard: `GET /` in a real headless Chromium against `depthflow serve` fed by the
simulator, and its event stream with clients that stop reading, disconnect, or outlive the server.

With ``CI=true`` a missing Chromium or Playwright fails the browser test; elsewhere it is skipped
with the reason. Playwright drives the system's Chromium (``/usr/bin/chromium``, Debian's
package): no browser is ever downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import CI
from tests.integration import test_api
from tests.integration.test_faults import (
    SYMBOLS,
    serve_env,
    start_serve,
    start_simulator,
    terminate,
    wait_until,
)

CHROMIUM = Path(os.environ.get("DEPTHFLOW_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = Path("/tmp/dashboard.png")
# Hang guards only, sized for a loaded 2-core machine: each check polls until it holds.
LIVE_S = 120  # both books live with ticks, from `serve` answering
PAGE_S = 120  # the page drawing, then updating
STREAM_S = 60  # frames reaching an in-process client
UVICORN_GAVE_UP = "timeout graceful shutdown exceeded"

# The in-process app of the API tests (PostgreSQL and Redis, no feed); frames fed by hand.
app = test_api.app
feed_book = test_api.feed_book


# -- helpers -------------------------------------------------------------------------------------


def _playwright() -> Any:
    """`async_playwright`, or fail (CI) / skip (elsewhere) saying what is missing."""
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        _missing(f"playwright is not installed ({exc}); pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium, or DEPTHFLOW_CHROMIUM)")
    return async_playwright


def _missing(message: str) -> None:
    if CI:
        pytest.fail(message + " (CI=true: the browser test must run)", pytrace=False)
    pytest.skip(message)


async def _state(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/dashboard/state")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def _both_books_live(client: httpx.AsyncClient) -> bool:
    books = (await _state(client))["books"]
    return len(books) == 2 and all(
        # No chart before the symbol's first tick has gone through the SMA kernel.
        b["state"] == "live" and len(b.get("chart", {}).get("points", ())) >= 2
        for b in books.values()
    )


async def _page_stats(page: Any, holds: Callable[[dict[str, Any]], bool], what: str) -> Any:
    """``window.__depthflow`` once ``holds`` is true of it."""
    deadline = time.monotonic() + PAGE_S
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = await page.evaluate("() => JSON.parse(JSON.stringify(window.__depthflow || {}))")
        if seen and holds(seen):
            return seen
        await asyncio.sleep(0.25)
    raise TimeoutError(f"the page never showed {what}; last seen {seen}")


# Pixels of the WAP line's blue (#60a5fa) on each chart: only drawn from two points on.
_WAP_PIXELS_JS = """() => [...document.querySelectorAll("canvas.chart")].map((c) => {
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 200 && d[i] < 140 && d[i + 1] > 130 && d[i + 1] < 200 && d[i + 2] > 210) n++;
  return n;
})"""


# -- in a browser --------------------------------------------------------------------------------


async def test_the_dashboard_draws_live_data_offline(
    running: contextlib.AsyncExitStack,
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    async_playwright = _playwright()
    sim = await start_simulator(running, rate=20, gap_every=150)
    serve = await start_serve(running, serve_env(sim, clean_db, redis_url, redis_prefix), tmp_path)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=30) as client:
        await wait_until(lambda: _both_books_live(client), LIVE_S, "both books live with ticks")

    playwright = await async_playwright().start()
    running.push_async_callback(playwright.stop)
    browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
    running.push_async_callback(browser.close)
    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(serve.base_url + "/")

    # The two busiest symbols by default (here: both), each with a chart and a full ladder.
    first = await _page_stats(
        page,
        lambda s: (
            s["updates"] >= 1
            and sorted(s["symbols"]) == sorted(x.upper() for x in SYMBOLS)
            and s["points"] >= 4
            and s["ladderRows"] >= 2
            and all(s["lastUpdateId"].get(x) for x in s["symbols"])
        ),
        "both symbols drawn",
    )
    # And it keeps updating: more frames, and each book further along.
    await _page_stats(
        page,
        lambda s: (
            s["updates"] > first["updates"]
            and all(s["lastUpdateId"][x] > first["lastUpdateId"][x] for x in first["symbols"])
        ),
        "new frames with newer update ids",
    )
    wap_pixels = await page.evaluate(_WAP_PIXELS_JS)
    assert len(wap_pixels) == 2
    assert all(n > 200 for n in wap_pixels), wap_pixels
    bid_prices = await page.locator(".ladder-rows .lrow .bp").all_inner_texts()
    ask_prices = await page.locator(".ladder-rows .lrow .ap").all_inner_texts()
    assert sum(bool(p) for p in bid_prices) >= 2
    assert sum(bool(p) for p in ask_prices) >= 2
    await page.screenshot(path=str(SCREENSHOT), full_page=True)

    assert errors == []
    local = serve.base_url + "/"
    assert requested, "the page made no request"
    outside = [url for url in requested if not url.startswith((local, "data:"))]
    assert outside == [], "the dashboard must work offline"

    # SIGTERM with the page's stream open: it ends, and uvicorn does not wait it out.
    await terminate(serve)
    assert UVICORN_GAVE_UP not in serve.log_text()


# -- streams against a real server ---------------------------------------------------------------


async def test_sigterm_ends_every_open_stream(
    running: contextlib.AsyncExitStack,
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    sim = await start_simulator(running, rate=20)
    serve = await start_serve(running, serve_env(sim, clean_db, redis_url, redis_prefix), tmp_path)
    # A client that never reads a byte of its stream.
    idle = socket.create_connection(("127.0.0.1", serve.port))
    running.callback(idle.close)
    idle.sendall(b"GET /dashboard/stream HTTP/1.1\r\nHost: dashboard\r\n\r\n")
    frames: list[dict[str, Any]] = []

    async def read_stream() -> None:
        async with (
            httpx.AsyncClient(base_url=serve.base_url, timeout=30) as client,
            client.stream("GET", "/dashboard/stream") as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    frames.append(json.loads(line.removeprefix("data: ")))

    reader = asyncio.ensure_future(read_stream())
    running.push_async_callback(_cancel, reader)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=30) as client:

        async def both_streaming() -> bool:
            return len(frames) >= 2 and (await _state(client))["service"]["clients"] == 2

        await wait_until(both_streaming, LIVE_S, "two stream clients")

    await terminate(serve)
    # The reader's stream came to its end (an abrupt close would have raised).
    await asyncio.wait_for(reader, STREAM_S)
    assert UVICORN_GAVE_UP not in serve.log_text()
    assert frames[-1]["frame"] > frames[0]["frame"]


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


# -- streams in process: a client that stops reading ---------------------------------------------


class _Client:
    """An ASGI client of ``/dashboard/stream``; with ``stuck`` its ``send`` never returns after
    the first frame, as uvicorn's does while a client that stopped reading has a full socket."""

    def __init__(self, app: FastAPI, *, stuck: bool) -> None:
        self.messages: list[dict[str, Any]] = []
        self._stuck = stuck
        self._disconnect = asyncio.Event()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/dashboard/stream",
            "raw_path": b"/dashboard/stream",
            "root_path": "",
            "query_string": b"symbols=btcusdt",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }
        self.task = asyncio.ensure_future(app(scope, self._receive, self._send))

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [
            json.loads(m["body"].removeprefix(b"data: "))
            for m in self.messages
            if m["type"] == "http.response.body" and m.get("body", b"").startswith(b"data: ")
        ]

    def disconnect(self) -> None:
        self._disconnect.set()

    async def _receive(self) -> dict[str, Any]:
        await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if self._stuck and self.frames:
            await asyncio.Event().wait()


async def test_a_client_that_stops_reading_skips_frames_and_holds_back_nothing(
    app: FastAPI,
) -> None:
    service, dashboard = test_api.service_of(app), app.state.dashboard
    await feed_book(service, 30)
    stuck = _Client(app, stuck=True)
    reader = _Client(app, stuck=False)
    try:
        await wait_until(
            _holds(lambda: dashboard.hub.skipped >= 6 and len(reader.frames) >= 6),
            STREAM_S,
            "frames skipped for the stuck client while the other reads on",
        )
        # The stuck client holds its first frame only; the producer went on without it.
        assert len(stuck.frames) == 1
        assert reader.frames[-1]["frame"] > reader.frames[0]["frame"] + 4
        assert dashboard.hub.clients == 2
        # Ingestion goes on, and the reader sees it.
        ticks = service.metrics.ticks
        for u in range(131, 141):
            service.pipeline.on_frame(test_api.depth_frame(u, 2.0), 0.0)
        assert service.metrics.ticks == ticks + 10
        await wait_until(
            _holds(lambda: reader.frames[-1]["books"]["BTCUSDT"]["last_update_id"] == 140),
            STREAM_S,
            "the reader to see the new ticks",
        )
        # A disconnect ends the stuck stream although it is blocked writing.
        stuck.disconnect()
        await asyncio.wait_for(stuck.task, STREAM_S)
        assert dashboard.hub.clients == 1
    finally:
        for client in (stuck, reader):
            client.disconnect()
        await asyncio.wait([stuck.task, reader.task])
    assert dashboard.hub.clients == 0


async def test_closing_the_hub_completes_every_stream(app: FastAPI) -> None:
    dashboard = app.state.dashboard
    await feed_book(test_api.service_of(app), 5)
    client = _Client(app, stuck=False)
    await wait_until(_holds(lambda: len(client.frames) >= 2), STREAM_S, "two frames")
    dashboard.hub.close()  # what the server's exit and the app's shutdown do
    await asyncio.wait_for(client.task, STREAM_S)
    last = client.messages[-1]
    assert last["type"] == "http.response.body"
    assert last.get("more_body", False) is False  # a complete response, not a cut one
    assert client.messages[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in client.messages[0]["headers"]
    assert dashboard.hub.clients == 0


def _holds(check: Callable[[], bool]) -> Callable[[], Any]:
    async def poll() -> bool:
        return check()

    return poll
