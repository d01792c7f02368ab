"""Log formats: JSON lines for machines, readable lines for people, and what each lets through."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from depthflow.config import load_settings
from depthflow.logs import ConsoleFormatter, configure_logging, resolve_format


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handler and some levels: put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


def record(event: str, fields: dict[str, object] | None = None, **kw: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        kw.pop("name", "depthflow.feed"),  # type: ignore[arg-type]
        kw.pop("level", logging.INFO),  # type: ignore[arg-type]
        __file__,
        1,
        event,
        None,
        None,
    )
    # 2024-01-02 03:04:05.678 local time: the console shows local time.
    rec.created = time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1)) + 0.678
    rec.msecs = 678.0
    if fields is not None:
        rec.fields = fields
    return rec


def test_console_line_is_time_level_event_then_fields() -> None:
    line = ConsoleFormatter().format(
        record(
            "feed_connected",
            {
                "url": "ws://127.0.0.1:8765/stream?streams=btcusdt@depth@100ms",
                "streams": 200,
                "ratio": 0.5,
                "ok": True,
                "missing": None,
                "error": "ConnectionRefusedError(111, 'Connection refused')",
                "empty": "",
                "expr": "a=b",
                "symbols": ["BTCUSDT", "ETHUSDT"],
            },
        )
    )
    assert line == (
        "03:04:05.678 INFO  feed_connected  "
        "url=ws://127.0.0.1:8765/stream?streams=btcusdt@depth@100ms streams=200 ratio=0.5 "
        "ok=true missing=null error=\"ConnectionRefusedError(111, 'Connection refused')\" "
        'empty="" expr=a=b symbols=["BTCUSDT","ETHUSDT"]'
    )


def test_console_names_foreign_loggers_and_adds_the_traceback() -> None:
    assert (
        ConsoleFormatter().format(record("Started server process [7]", name="uvicorn.error"))
        == "03:04:05.678 INFO  [uvicorn.error] Started server process [7]"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("task_failed", {"task": "feed"}, level=logging.ERROR)
        rec.exc_info = __import__("sys").exc_info()
    first, *rest = ConsoleFormatter().format(rec).splitlines()
    assert first == "03:04:05.678 ERROR task_failed  task=feed"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


def test_colour_only_on_a_terminal() -> None:
    plain, tty = io.StringIO(), Terminal()
    for stream in (plain, tty):
        assert configure_logging("INFO", "console", stream) == "console"
        logging.getLogger("depthflow.feed").warning("feed_closed", extra={"fields": {"code": 1006}})
    assert "\x1b[" not in plain.getvalue()
    assert plain.getvalue().endswith(" WARNING feed_closed  code=1006\n")
    coloured = tty.getvalue()
    assert "\x1b[33mWARNING\x1b[0m" in coloured
    assert "\x1b[1mfeed_closed\x1b[0m" in coloured


def test_the_format_follows_the_terminal_unless_chosen() -> None:
    assert resolve_format(None, Terminal()) == "console"
    assert resolve_format(None, io.StringIO()) == "json"
    assert resolve_format("json", Terminal()) == "json"
    assert resolve_format("console", io.StringIO()) == "console"


def test_log_format_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    assert load_settings().log_format is None
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    assert load_settings().log_format == "json"
    monkeypatch.setenv("LOG_FORMAT", "")
    assert load_settings().log_format is None


def test_json_lines_keep_every_signal() -> None:
    out = io.StringIO()
    assert configure_logging("INFO", None, out) == "json"
    signals = logging.getLogger("depthflow.signals")
    for n in range(50):
        signals.info("trading_signal", extra={"fields": {"symbol": "BTCUSDT", "n": n}})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["n"] for line in lines] == list(range(50))
    assert {line["event"] for line in lines} == {"trading_signal"}
    assert lines[0]["logger"] == "depthflow.signals"


def test_console_shows_a_few_signals_and_says_how_many_it_held_back() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", out)
    signals = logging.getLogger("depthflow.signals")
    for n in range(50):
        signals.info("trading_signal", extra={"fields": {"symbol": "BTCUSDT", "n": n}})
    signals.info("signals_summary", extra={"fields": {"signals": 50}})
    logging.getLogger("depthflow.feed").info("feed_connected")
    lines = out.getvalue().splitlines()
    shown = [line for line in lines if " trading_signal " in line]
    assert [line.split("n=")[1] for line in shown] == ["0", "1", "2", "3", "4"]
    # Everything else still gets through.
    assert lines[-2].endswith("signals_summary  signals=50")
    assert lines[-1].endswith("feed_connected")


def test_http_client_chatter_only_at_debug() -> None:
    configure_logging("INFO", "json", io.StringIO())
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING
    configure_logging("DEBUG", "json", io.StringIO())
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.DEBUG
