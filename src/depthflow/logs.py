"""JSON-lines logging on stdout.

Call sites log a short event name as the message and put structured fields under
``extra={"fields": {...}}``; every line is one JSON object: ``{"time", "level", "logger", "event",
...fields}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "LogLimiter", "configure_logging"]


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


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Route every logger (ours, uvicorn's) through one JSON handler on stdout."""
    handler = logging.StreamHandler(stream or sys.stdout)
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
