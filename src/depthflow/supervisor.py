"""One owner for every long-lived task: start, watch, restart with backoff, stop.

A task that ends while it was meant to run (an exception, or a return) is logged with its
traceback, counted (`depthflow_task_restarts_total{task}`) and started again after a backoff. If
one keeps dying (``restart_limit`` times within ``window_s``) the supervisor gives up on the whole
process through ``on_give_up``, so an orchestrator can restart it: a service that limps along
without its writer or feed would only pretend to work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from depthflow.accounting import CheckState, ErrorKind
from depthflow.metrics import Metrics

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 10.0


@dataclass(slots=True)
class _Supervised:
    name: str
    factory: TaskFactory
    oneshot: bool  # finishing is success; only a failure restarts it
    task: asyncio.Task[None] | None = None
    restart: asyncio.TimerHandle | None = None
    deaths: deque[float] = field(default_factory=deque)
    finished: bool = False


class Supervisor:
    """Starts named tasks and keeps them running until `stop` or `cancel`."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        restart_limit: int,
        window_s: float,
        on_give_up: Callable[[str], None],
    ) -> None:
        self._metrics = metrics
        self._limit = restart_limit
        self._window_s = window_s
        self._on_give_up = on_give_up
        self._tasks: dict[str, _Supervised] = {}
        self._stopping = False
        self.gave_up: str | None = None  # the task that made the supervisor give up

    def start(self, name: str, factory: TaskFactory, *, oneshot: bool = False) -> None:
        """Run ``factory()`` as task ``name``; restarted whenever it ends unexpectedly."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already supervised")
        entry = _Supervised(name, factory, oneshot)
        self._tasks[name] = entry
        self._spawn(entry)

    def states(self) -> dict[str, CheckState]:
        """Each task's state: ok (running or finished), restarting or stopped."""
        return {name: self._state(entry) for name, entry in self._tasks.items()}

    def alive(self, name: str) -> bool:
        entry = self._tasks.get(name)
        return entry is not None and entry.task is not None and not entry.task.done()

    @property
    def all_running(self) -> bool:
        return all(state is CheckState.OK for state in self.states().values())

    async def cancel(self, name: str) -> None:
        """Stop supervising ``name`` and cancel it; returns once it has ended."""
        entry = self._tasks.get(name)
        if entry is None:
            return
        self._unwatch(entry)
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
            # wait(), not `await task`: our caller's own cancellation must still propagate.
            await asyncio.wait([entry.task])

    async def join(self, name: str, timeout: float) -> bool:  # noqa: ASYNC109 (a stop budget)
        """Stop supervising ``name`` and wait up to ``timeout`` s for it to end on its own (it
        was asked to stop); cancel it past that. False if it had to be cancelled."""
        entry = self._tasks.get(name)
        if entry is None:
            return True
        self._unwatch(entry)
        task = entry.task
        if task is None or task.done():
            return True
        done, _ = await asyncio.wait([task], timeout=timeout)
        if done:
            return True
        log.error("task_stop_timeout", extra={"fields": {"task": name, "timeout_s": timeout}})
        await self.cancel(name)
        return False

    def stop_watching(self) -> None:
        """From now on a task that ends is not restarted (the service is stopping)."""
        self._stopping = True
        for entry in self._tasks.values():
            if entry.restart is not None:
                entry.restart.cancel()
                entry.restart = None

    async def cancel_all(self) -> None:
        self.stop_watching()
        for name in list(self._tasks):
            await self.cancel(name)

    # -- internals ---------------------------------------------------------------------------------

    def _state(self, entry: _Supervised) -> CheckState:
        if entry.task is not None and not entry.task.done():
            return CheckState.OK
        if entry.finished:
            return CheckState.OK
        if entry.restart is not None:
            return CheckState.RESTARTING
        return CheckState.STOPPED

    def _spawn(self, entry: _Supervised) -> None:
        entry.restart = None
        entry.task = asyncio.create_task(entry.factory(), name=f"depthflow-{entry.name}")
        entry.task.add_done_callback(lambda task: self._ended(entry, task))

    def _unwatch(self, entry: _Supervised) -> None:
        entry.finished = True  # ending now is expected
        if entry.restart is not None:
            entry.restart.cancel()
            entry.restart = None

    def _ended(self, entry: _Supervised, task: asyncio.Task[None]) -> None:
        if entry.task is not task or entry.finished or self._stopping:
            return
        if task.cancelled():
            error: BaseException | None = None
        else:
            error = task.exception()
        if error is None and entry.oneshot:
            entry.finished = True
            return
        self._metrics.count_error(ErrorKind.TASK)
        log.error(
            "task_failed",
            exc_info=error,
            extra={
                "fields": {
                    "task": entry.name,
                    "outcome": "cancelled" if task.cancelled() else "error" if error else "ended",
                }
            },
        )
        now = time.monotonic()
        entry.deaths.append(now)
        while entry.deaths and now - entry.deaths[0] > self._window_s:
            entry.deaths.popleft()
        if len(entry.deaths) >= self._limit:
            self.gave_up = entry.name
            log.critical(
                "task_keeps_failing",
                extra={
                    "fields": {
                        "task": entry.name,
                        "failures": len(entry.deaths),
                        "window_s": self._window_s,
                    }
                },
            )
            self._on_give_up(entry.name)
            return
        delay = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** (len(entry.deaths) - 1))
        self._metrics.count_task_restart(entry.name)
        log.warning("task_restarting", extra={"fields": {"task": entry.name, "delay_s": delay}})
        entry.restart = asyncio.get_running_loop().call_later(delay, self._spawn, entry)
