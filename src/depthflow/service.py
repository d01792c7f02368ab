"""The running service: creates every component, starts its tasks under one supervisor, stops them
in order.

The FastAPI lifespan owns one `Service`. Start order: connections, writer, Redis flusher,
analytics (with the Numba kernel compiled before any event arrives), the health checker, the
restore of the stored sequence's edges (for the gap ledger), then the feed. Stop order is the
reverse of the data flow: feed first, then the analytics drain, then the writer's last flush, then
the Redis push, then the connections; each step isolated, under one shutdown budget.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.accounting import CheckState, LossReason
from depthflow.book import SyncState
from depthflow.config import Settings
from depthflow.feed import Feed, FeedState, Tap
from depthflow.metrics import Metrics, ProcessStats
from depthflow.pipeline import Pipeline
from depthflow.redis_sink import RedisSink, create_client
from depthflow.signals import Analytics
from depthflow.storage.db import make_engine
from depthflow.storage.edges import stored_edges
from depthflow.storage.writer import BatchWriter
from depthflow.supervisor import Supervisor

__all__ = ["Checks", "Service"]

log = logging.getLogger(__name__)

# A health probe must answer fast even when a dependency hangs.
_PROBE_TIMEOUT_S = 1.0
# The checker refreshes the shared result this often; probes read it, never the dependencies.
_CHECK_INTERVAL_S = 0.5
# A result older than this means the checker itself is stuck: say so rather than trust it.
_CHECK_MAX_AGE_S = 3.0
_SHUTDOWN_BUDGET_S = 60.0
_RESTORE_RETRY_MAX_S = 30.0


@dataclass(slots=True)
class Checks:
    """One health-check result, shared by every /health, /ready and /live request."""

    at: float  # monotonic time it was computed
    database: CheckState = CheckState.OK
    redis: CheckState = CheckState.DISABLED
    extra: dict[str, Any] = field(default_factory=dict)


class Service:
    """Every long-lived object of one depthflow process."""

    def __init__(
        self,
        settings: Settings,
        *,
        with_feed: bool = True,
        tap: Tap | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.metrics = Metrics()
        self.process_stats: ProcessStats = self.metrics.process
        # The API's engine: every query under a statement timeout, so a lock or a slow plan
        # answers 503 instead of holding a pooled connection (the writer's engine has none).
        self.engine: AsyncEngine = make_engine(
            settings.database_url, statement_timeout_ms=settings.api_statement_timeout_ms
        )
        self._writer_engine = make_engine(settings.database_url, pool_size=1, pre_ping=False)
        self.redis = create_client(settings.redis_url)
        self.redis_sink = RedisSink(
            self.redis,
            self.metrics,
            prefix=settings.redis_prefix,
            flush_interval=settings.metrics_flush_ms / 1000,
        )
        self.writer = BatchWriter(
            self._writer_engine,
            self.metrics,
            batch_max_rows=settings.batch_max_rows,
            batch_max_delay_ms=settings.batch_max_delay_ms,
            buffer_max_rows=settings.buffer_max_rows,
        )
        self.analytics = Analytics(
            sma_short=settings.sma_short,
            sma_long=settings.sma_long,
            writer=self.writer,
            metrics=self.metrics,
        )
        self.pipeline = Pipeline(
            settings.symbols,
            self.writer,
            self.analytics,
            self.metrics,
            stale_resync_s=settings.stale_resync_s,
        )
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
        self.feed: Feed | None = (
            Feed(
                settings,
                self.pipeline,
                self.metrics,
                self.http,
                wait_capacity=self.writer.wait_capacity,
                tap=tap,
            )
            if with_feed
            else None
        )
        self.started_at = time.time()
        self.fatal: str | None = None  # the task whose failures made the process give up
        self._on_fatal = on_fatal if on_fatal is not None else _terminate_process
        self.supervisor = Supervisor(
            self.metrics,
            restart_limit=settings.task_restart_limit,
            window_s=settings.task_restart_window_s,
            on_give_up=self._give_up,
        )
        self._checks = Checks(at=time.monotonic())
        self._register_gauges()

    # -- life --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every task; if a step fails, what was started is stopped before re-raising."""
        try:
            await self._start()
        except BaseException:
            log.error("service_start_failed", exc_info=True)
            await self.stop()
            raise

    async def _start(self) -> None:
        sup = self.supervisor
        sup.start("writer", self.writer.run)
        sup.start("redis", self.redis_sink.run)
        # Compile the SMA kernel now, so no event ever waits for the JIT.
        await self.analytics.warm_up()
        sup.start("analytics", self.analytics.run)
        await self._refresh_checks()
        sup.start("health", self._check_forever)
        sup.start("restore", self._restore_edges, oneshot=True)
        if self.feed is not None:
            sup.start("feed", self.feed.run)
        log.info(
            "service_started",
            extra={
                "fields": {"symbols": list(self.settings.symbols), "feed": self.feed is not None}
            },
        )

    async def stop(self) -> None:
        """Stop in data-flow order so every computed row is flushed before the connections close.

        Each step is isolated (one that fails or hangs is logged and the next runs) and all of
        them share one budget.
        """
        sup = self.supervisor
        sup.stop_watching()
        deadline = time.monotonic() + _SHUTDOWN_BUDGET_S
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("feed", lambda: sup.cancel("feed")),
            ("restore", lambda: sup.cancel("restore")),
            ("health", lambda: sup.cancel("health")),
            ("books", self._discard_books),
            ("analytics", self.analytics.stop),
            ("analytics_task", lambda: sup.join("analytics", self._left(deadline))),
            ("writer", lambda: self.writer.stop(timeout=max(1.0, self._left(deadline) - 5))),
            ("writer_task", lambda: sup.join("writer", self._left(deadline))),
            ("redis", self.redis_sink.stop),
            ("redis_task", lambda: sup.join("redis", self._left(deadline))),
            ("http", self.http.aclose),
            ("redis_client", self._close_redis),
            ("engine", self.engine.dispose),
            ("writer_engine", self._writer_engine.dispose),
        ]
        for name, step in steps:
            try:
                async with asyncio.timeout(max(0.1, self._left(deadline))):
                    await step()
            except Exception:
                log.exception("service_stop_step_failed", extra={"fields": {"step": name}})
        await sup.cancel_all()
        log.info("service_stopped", extra={"fields": self.metrics.local_totals()})

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    async def _discard_books(self) -> None:
        # Events still buffered for a snapshot will never become ticks: count them.
        self.pipeline.reset_all(reason=LossReason.SHUTDOWN)

    async def _close_redis(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def _give_up(self, task: str) -> None:
        self.fatal = task
        self._on_fatal(task)

    # -- the gap ledger's view of earlier runs -----------------------------------------------------

    async def _restore_edges(self) -> None:
        """Read each symbol's last stored update id (earlier runs, a crash included) so the hole
        up to this run's first tick is recorded; retried until the database answers."""
        delay = 0.5
        while True:
            try:
                edges = await stored_edges(self.engine, self.pipeline.syncs, self.started_at)
            except Exception as exc:
                log.warning("restore_edges_failed", extra={"fields": {"error": repr(exc)}})
                await asyncio.sleep(delay)
                delay = min(_RESTORE_RETRY_MAX_S, delay * 2)
                continue
            for symbol, (last_update_id, event_time) in edges.items():
                self.pipeline.restore(symbol, last_update_id, event_time)
            return

    # -- health ------------------------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_INTERVAL_S)
            await self._refresh_checks()

    async def _refresh_checks(self) -> None:
        database, redis_state = await asyncio.gather(self._probe_database(), self._probe_redis())
        self._checks = Checks(at=time.monotonic(), database=database, redis=redis_state)

    async def _probe_database(self) -> CheckState:
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.debug("database_probe_failed", extra={"fields": {"error": repr(exc)}})
            return CheckState.DOWN
        return CheckState.OK

    async def _probe_redis(self) -> CheckState:
        if self.redis is None:
            return CheckState.DISABLED
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                ok = await self.redis_sink.ping()
        except TimeoutError:
            ok = False
        return CheckState.OK if ok else CheckState.DOWN

    def database_state(self) -> CheckState:
        """Down when the probe or the writer fails; slow when a write takes seconds."""
        if self._checks.database is not CheckState.OK or not self.writer.healthy:
            return CheckState.DOWN
        if self.writer.slow:
            return CheckState.SLOW
        return CheckState.OK

    def feed_state(self) -> CheckState:
        if self.feed is None:
            return CheckState.DISABLED
        if not self.supervisor.alive("feed") or self.feed.state != FeedState.CONNECTED:
            return CheckState.DISCONNECTED
        if self.feed.stalled:
            return CheckState.STALLED
        return CheckState.OK if self.pipeline.in_sync else CheckState.SYNCING

    def books_state(self) -> dict[str, str]:
        return {s: state.name.lower() for s, state in self.pipeline.states().items()}

    def checks(self) -> dict[str, Any]:
        """The latest check result (at most ~`_CHECK_INTERVAL_S` old), never a fresh probe: a
        burst of probes costs nothing and cannot pile up on a slow dependency."""
        age = time.monotonic() - self._checks.at
        stale = age > _CHECK_MAX_AGE_S
        return {
            "database": CheckState.STALLED if stale else self.database_state(),
            "redis": CheckState.STALLED if stale else self._checks.redis,
            "feed": self.feed_state(),
            "books": self.books_state(),
            "tasks": self.supervisor.states(),
            "checked_s_ago": round(age, 3),
        }

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Whether the process works: every supervised task runs and a connected feed receives."""
        tasks = self.supervisor.states()
        feed = self.feed_state()
        ok = self.fatal is None and all(s is CheckState.OK for s in tasks.values())
        ok = ok and feed is not CheckState.STALLED
        return ok, {"tasks": tasks, "feed": feed, "fatal": self.fatal}

    # -- gauges ------------------------------------------------------------------------------------

    def _register_gauges(self) -> None:
        m = self.metrics
        m.register_gauge(
            "depthflow_buffered_rows", "Rows waiting for the writer", lambda: self.writer.buffered
        )
        m.register_gauge(
            "depthflow_analytics_pending",
            "Ticks waiting for the SMA kernel",
            lambda: self.analytics.pending,
        )
        m.register_gauge(
            "depthflow_book_in_sync",
            "1 when the symbol's local book is live",
            lambda: {s: float(st is SyncState.LIVE) for s, st in self.pipeline.states().items()},
            label="symbol",
        )
        m.register_gauge(
            "depthflow_redis_up",
            "1 when the last Redis push succeeded",
            lambda: float(self.redis_sink.healthy),
        )
        m.register_gauge(
            "depthflow_database_up",
            "1 when the last database write succeeded and none is slow",
            lambda: float(self.writer.healthy and not self.writer.slow),
        )
        m.register_gauge(
            "depthflow_database_slow",
            "1 while a write attempt takes longer than a few seconds",
            lambda: float(self.writer.slow),
        )
        m.register_gauge(
            "depthflow_counters_started_seconds",
            "Unix time this process started counting",
            lambda: self.started_at,
        )


def _terminate_process(task: str) -> None:
    """Ask the server to shut down gracefully (rows are flushed); the CLI then exits non-zero."""
    log.critical("service_giving_up", extra={"fields": {"task": task}})
    os.kill(os.getpid(), signal.SIGTERM)
