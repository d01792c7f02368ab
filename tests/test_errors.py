"""The pieces of a one-line explanation: name lookups, offline hints, URLs fit for a log line."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from depthflow.accounting import SnapshotReason
from depthflow.config import Settings
from depthflow.errors import UserError, offline_hint, one_line, unresolved_host
from depthflow.feed import Feed, display_url
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline
from tests.sinks import Rows, Waps


def test_a_failed_lookup_is_found_under_the_wrappers() -> None:
    assert unresolved_host(socket.gaierror(-2, "Name or service not known"))
    wrapped = ConnectionError("All connection attempts failed")
    wrapped.__cause__ = socket.gaierror(-3, "Temporary failure in name resolution")
    assert unresolved_host(wrapped)
    context = RuntimeError("while connecting")
    context.__context__ = wrapped
    assert unresolved_host(context)
    assert not unresolved_host(ConnectionRefusedError(111, "Connection refused"))
    assert not unresolved_host(TimeoutError())


def test_the_offline_hint_names_the_host_and_the_simulator() -> None:
    hint = offline_hint("wss://stream.binance.com:9443/stream?streams=btcusdt@depth@100ms")
    assert hint.startswith("host stream.binance.com does not resolve")
    assert "`depthflow simulate`" in hint
    assert "BINANCE_WS_URL=ws://127.0.0.1:8765" in hint
    assert "BINANCE_REST_URL=http://127.0.0.1:8765" in hint


def test_a_user_error_is_one_line() -> None:
    error = UserError("first\nsecond   third\n")
    assert str(error) == "first second third"
    assert error.exit_code == 1
    assert UserError("x", exit_code=2).exit_code == 2
    assert one_line("  a\tb \n c ") == "a b c"


def test_a_long_stream_url_keeps_its_first_stream_and_the_count() -> None:
    streams = "/".join(f"s{n:04d}usdt@depth@100ms" for n in range(200))
    url = f"wss://stream.binance.com:9443/stream?streams={streams}"
    assert display_url(url) == (
        "wss://stream.binance.com:9443/stream?streams=s0000usdt@depth@100ms/...(+199 more)"
    )
    short = "ws://127.0.0.1:8765/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms"
    assert display_url(short) == short
    assert display_url("ws://127.0.0.1:8765/ws/btcusdt@depth") == (
        "ws://127.0.0.1:8765/ws/btcusdt@depth"
    )


class _Catch(logging.Handler):
    """Sets ``event`` at the first record named ``message`` (logged on the loop's thread)."""

    def __init__(self, message: str, event: asyncio.Event) -> None:
        super().__init__()
        self.message, self.event = message, event
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.message:
            self.records.append(record)
            self.event.set()


class _NoSnapshots:
    async def depth(self, symbol: str, limit: int, reason: SnapshotReason) -> str:
        raise AssertionError("never connected, so never asked")


async def test_a_feed_whose_host_does_not_resolve_says_so_and_how_to_go_offline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, binance_ws_url="wss://no-such-host.invalid:9443", connect_interval_s=0
    )
    metrics = Metrics()
    pipeline = Pipeline(["btcusdt"], Rows(), Waps(), metrics)
    feed = Feed(settings, pipeline, metrics, _NoSnapshots())
    caplog.set_level(logging.WARNING, logger="depthflow.feed")
    failed = asyncio.Event()
    catcher = _Catch("feed_connect_failed", failed)
    logging.getLogger("depthflow.feed").addHandler(catcher)
    task = asyncio.create_task(feed.run())
    try:
        async with asyncio.timeout(60):
            await failed.wait()
    finally:
        logging.getLogger("depthflow.feed").removeHandler(catcher)
        task.cancel()
        await asyncio.wait([task])
    fields = catcher.records[0].fields  # type: ignore[attr-defined]
    assert fields["url"] == "wss://no-such-host.invalid:9443/stream?streams=btcusdt@depth@100ms"
    assert "gaierror" in fields["error"]
    assert fields["hint"].startswith("host no-such-host.invalid does not resolve")
    assert "depthflow simulate" in fields["hint"]
