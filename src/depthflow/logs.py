"""Logging for machines (JSON lines) and for people (one readable line per event).

Call sites log a short event name as the message and put structured fields under
``extra={"fields": {...}}``. `LOG_FORMAT=json` makes every line one JSON object: ``{"time",
"level", "logger", "event", ...fields}``; `LOG_FORMAT=console` one line such as
``14:03:22.123 INFO  feed_connected  shard=0 url=wss://... streams=200``, coloured on a terminal.
Unset, it is `console` when stdout is a terminal and `json` otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = [
    "ConsoleFormatter",
    "JsonFormatter",
    "LogFormat",
    "LogLimiter",
    "configure_logging",
    "resolve_format",
]

LogFormat = Literal["console", "json"]

# In console mode at most this many signal lines per window reach the terminal (the next one
# shown says how many were held back); `signals_summary` lines count them all. JSON keeps every
# one: the contract is one `trading_signal` line per signal.
_CONSOLE_SIGNAL_BURST = 5
_CONSOLE_SIGNAL_WINDOW_S = 10.0


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=_default, separators=(",", ":"))


_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_LEVEL_COLOURS = {
    "DEBUG": _DIM,
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL event  key=value ...`` in local time (logfmt-like: values with spaces
    or quotes are JSON-quoted, containers written as compact JSON). ``colour`` adds ANSI colours
    (for a terminal only). A logger other than ours is named in brackets after the level."""

    def __init__(self, *, colour: bool = False) -> None:
        super().__init__()
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        stamp = f"{stamp}.{int(record.msecs):03d}"
        level = f"{record.levelname:<5}"
        event = record.getMessage()
        fields = getattr(record, "fields", None)
        pairs = (
            [(str(key), _console_value(value)) for key, value in fields.items()]
            if isinstance(fields, dict)
            else []
        )
        source = "" if record.name.startswith("depthflow") else f"[{record.name}] "
        if self._colour:
            colour = _LEVEL_COLOURS.get(record.levelname, "")
            head = f"{_DIM}{stamp}{_RESET} {colour}{level}{_RESET} {source}{_BOLD}{event}{_RESET}"
            body = " ".join(f"{_DIM}{key}={_RESET}{value}" for key, value in pairs)
        else:
            head = f"{stamp} {level} {source}{event}"
            body = " ".join(f"{key}={value}" for key, value in pairs)
        line = f"{head}  {body}" if body else head
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _console_value(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_default, separators=(",", ":"))
    text = str(value)
    if not text or any(c.isspace() or c == '"' for c in text):
        return json.dumps(text)
    return text


class _SignalBurstFilter(logging.Filter):
    """Console only: lets a few `trading_signal` lines per window through (see
    `_CONSOLE_SIGNAL_BURST`); the next one shown carries ``held_back``, the number skipped."""

    def __init__(self) -> None:
        super().__init__()
        self._limiter = LogLimiter(_CONSOLE_SIGNAL_BURST, _CONSOLE_SIGNAL_WINDOW_S)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "trading_signal":
            return True
        held = self._limiter.allow("trading_signal")
        if held is None:
            return False
        if held:
            fields = getattr(record, "fields", None)
            record.fields = {**(fields if isinstance(fields, dict) else {}), "held_back": held}
        return True


def resolve_format(format: LogFormat | None, stream: TextIO) -> LogFormat:
    """``format``, or when None, `console` for a terminal and `json` for anything else."""
    if format is not None:
        return format
    return "console" if _isatty(stream) else "json"


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def configure_logging(
    level: str, format: LogFormat | None = None, stream: TextIO | None = None
) -> LogFormat:
    """Route every logger (ours, uvicorn's) through one handler on ``stream`` (stdout); the
    format used (see `resolve_format`)."""
    out = stream or sys.stdout
    chosen = resolve_format(format, out)
    handler = logging.StreamHandler(out)
    if chosen == "console":
        handler.setFormatter(ConsoleFormatter(colour=_isatty(out)))
        handler.addFilter(_SignalBurstFilter())
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Alembic announces each of its plugins at INFO on every run.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # The feed logs connection trouble itself, once, with context; the library's INFO lines
    # (and one line per frame at DEBUG) would only repeat it.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    # httpx logs every request at INFO (each snapshot, each exchangeInfo) and httpcore every
    # connection step at DEBUG: wanted only when debugging.
    chatter = logging.NOTSET if level == "DEBUG" else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(chatter)
    return chosen


class LogLimiter:
    """At most ``burst`` lines per key and window; the lines held back are counted and reported
    by the next line let through, so a hostile stream cannot flood the log and nothing is hidden.
    """

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        self._burst = burst
        self._window_s = window_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (start, lines, held back)

    def allow(self, key: str) -> int | None:
        """None to hold the line back; else the number of lines held back since the last one."""
        now = time.monotonic()
        start, lines, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self._window_s:
            start, lines = now, 0
        if lines >= self._burst:
            self._windows[key] = (start, lines, held + 1)
            return None
        self._windows[key] = (start, lines + 1, 0)
        return held
