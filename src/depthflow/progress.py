"""The progress line of `export`, `replay` and `record` on stderr: items done, rate and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Rows done, rows/s and (with a `total`) the ETA, on ``stream``: redrawn in place on a
    terminal, else one line every ``every_s`` (5 s). `finish` clears the terminal line."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float | None = None,
        unit: str = "rows",
    ) -> None:
        self.total: int | None = None
        self.exact = False  # whether `total` is a count rather than an estimate
        self.rows = 0
        self._stream = stream
        self._label = label
        self._tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._every_s = every_s if every_s is not None else (0.2 if self._tty else 5.0)
        self._started = clock()
        self._shown_at = self._started
        self._drawn = False
        self._unit = unit

    def begin(self, total: int | None, *, exact: bool) -> None:
        """The rows to come (for the ETA); rates count from now on."""
        self.total, self.exact = total, exact
        self._started = self._shown_at = self._clock()

    def advance(self, rows: int) -> None:
        self.rows += rows
        now = self._clock()
        if now - self._shown_at >= self._every_s:
            self._shown_at = now
            self._show(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self.rows / elapsed
        done = f"{self.rows:,}"
        eta = ""
        if self.total:
            about = "" if self.exact else "~"
            share = min(self.rows / self.total, 1.0)
            done += f" / {about}{self.total:,} {self._unit} ({share:.0%})"
            if rate > 0 and self.rows < self.total:
                eta = f"  ETA {_clock_text((self.total - self.rows) / rate)}"
        else:
            done += f" {self._unit}"
        return f"{self._label}: {done}  {rate:,.0f} {self._unit}/s{eta}"

    def _show(self, line: str) -> None:
        if self._tty:
            self._stream.write(f"\r\x1b[2K{line}")
            self._drawn = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
            self._drawn = False


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"
