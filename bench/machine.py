"""The machine the numbers come from: event loop, CPU meters, the environment record."""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psutil

__all__ = ["CpuTrace", "Environment", "MachineCpu", "PostgresCpu", "loop_name", "run_async"]

_T = TypeVar("_T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop `depthflow serve` gets (uvicorn's ``loop="auto"``: uvloop when installed): the
    floors and every client here run on it too."""
    from uvicorn.loops.auto import auto_loop_factory

    return auto_loop_factory(use_subprocess=False)


def loop_name() -> str:
    loop = _loop_factory()()
    try:
        return f"{type(loop).__module__}.{type(loop).__name__}"
    finally:
        loop.close()


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on the loop uvicorn would pick."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)


class MachineCpu:
    """Share of the whole machine's CPU time that was busy since this object was created."""

    def __init__(self) -> None:
        self._before = psutil.cpu_times()

    def busy(self) -> float:
        after = psutil.cpu_times()
        total = sum(after) - sum(self._before)
        idle = (after.idle + after.iowait) - (self._before.idle + self._before.iowait)
        return 1.0 - idle / total if total > 0 else math.nan


class CpuTrace:
    """CPU seconds of a process, sampled from /proc every ``every_s`` by `run` (a task of the
    caller's loop, so the process itself is not disturbed), to read the CPU it had used at a
    moment known only afterwards (a log line's time). The kernel counts in 10 ms ticks."""

    def __init__(self, pid: int, every_s: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._every_s = every_s
        self.samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds)

    async def run(self) -> None:
        """Sample until cancelled or the process is gone (its last sample then stands for
        its total)."""
        while True:
            try:
                self.sample()
            except psutil.Error:  # exited (or a zombie: nothing more to count)
                return
            await asyncio.sleep(self._every_s)

    def sample(self) -> float:
        times = self._process.cpu_times()
        cpu = float(times.user + times.system)
        self.samples.append((time.time(), cpu))
        return cpu

    def at(self, when: float) -> float:
        """The CPU seconds used by ``when`` (interpolated between the samples around it)."""
        samples = self.samples
        if not samples or when < samples[0][0]:
            raise ValueError("no sample before that moment")
        index = bisect.bisect_right(samples, (when, math.inf))
        if index >= len(samples):
            return samples[-1][1]
        (t0, c0), (t1, c1) = samples[index - 1], samples[index]
        return c0 + (c1 - c0) * ((when - t0) / (t1 - t0) if t1 > t0 else 0.0)


class PostgresCpu:
    """CPU seconds the PostgreSQL server processes of this machine used since creation (read
    only). Backends that ended meanwhile are not counted, those that started are in full."""

    def __init__(self) -> None:
        self._before = self._now()

    @staticmethod
    def _now() -> dict[int, float]:
        out: dict[int, float] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            times = proc.info["cpu_times"]
            if proc.info["name"] in ("postgres", "postmaster") and times is not None:
                out[proc.pid] = float(times.user + times.system)
        return out

    def seconds(self) -> float:
        return sum(cpu - self._before.get(pid, 0.0) for pid, cpu in self._now().items())


@dataclass(frozen=True)
class Environment:
    """Where a result comes from."""

    cpus: int | None = field(default_factory=os.cpu_count)
    python: str = field(default_factory=platform.python_version)
    platform: str = field(default_factory=platform.platform)
    event_loop: str = field(default_factory=loop_name)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
