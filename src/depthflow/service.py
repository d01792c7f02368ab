"""The running service: creates every component, starts its tasks, stops them in order.

The FastAPI lifespan owns one `Service`. Start order: connections, writer, Redis flusher,
analytics (with the Numba kernel compiled before any event arrives), then the feed. Stop order is
the reverse of the data flow: feed first, then the analytics drain, then the writer's last flush,
then the Redis push, then the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import httpx
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.accounting import LossReason
from depthflow.book import SyncState
from depthflow.config import Settings
from depthflow.feed import Feed, FeedState, Tap
from depthflow.metrics import Metrics, ProcessStats
from depthflow.pipeline import Pipeline
from depthflow.redis_sink import RedisSink
from depthflow.signals import Analytics
from depthflow.storage.db import make_engine
from depthflow.storage.writer import BatchWriter

__all__ = ["Service"]

log = logging.getLogger(__name__)

# A health probe must answer fast even when a dependency hangs.
_PROBE_TIMEOUT_S = 1.0


class Service:
    """Every long-lived object of one depthflow process."""

    def __init__(self, settings: Settings, *, with_feed: bool = True, tap: Tap | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.process_stats: ProcessStats = self.metrics.process
        self.engine: AsyncEngine = make_engine(settings.database_url)
        self._writer_engine = make_engine(settings.database_url, pool_size=1, pre_ping=False)
        self.redis: aioredis.Redis | None = (
            aioredis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            if settings.redis_url
            else None
        )
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
        self.pipeline = Pipeline(settings.symbols, self.writer, self.analytics, self.metrics)
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
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._register_gauges()

    async def start(self) -> None:
        self._spawn("writer", self.writer.run())
        self._spawn("redis", self.redis_sink.run())
        # Compile the SMA kernel now, so no event ever waits for the JIT.
        await self.analytics.warm_up()
        self._spawn("analytics", self.analytics.run())
        if self.feed is not None:
            self._spawn("feed", self.feed.run())
        log.info(
            "service_started",
            extra={
                "fields": {"symbols": list(self.settings.symbols), "feed": self.feed is not None}
            },
        )

    async def stop(self) -> None:
        """Stop in data-flow order so every computed row is flushed before the connections close."""
        await self._cancel("feed")
        # Events still buffered for a snapshot will never become ticks: count them.
        self.pipeline.reset_all(reason=LossReason.SHUTDOWN)
        await self.analytics.stop()
        await self._join("analytics")
        await self.writer.stop()
        await self._join("writer")
        await self.redis_sink.stop()
        await self._join("redis")
        await self.http.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()
        await self._writer_engine.dispose()
        log.info("service_stopped", extra={"fields": self.metrics.local_totals()})

    def task_alive(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def check_database(self) -> bool:
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.debug("database_probe_failed", extra={"fields": {"error": repr(exc)}})
            return False
        return True

    async def check_redis(self) -> str:
        if self.redis is None:
            return "disabled"
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                ok = await self.redis_sink.ping()
        except TimeoutError:
            ok = False
        return "ok" if ok else "down"

    def feed_status(self) -> str:
        if self.feed is None:
            return "disabled"
        if not self.task_alive("feed") or self.feed.state != FeedState.CONNECTED:
            return "disconnected"
        return "ok" if self.pipeline.in_sync else "syncing"

    def books_status(self) -> dict[str, str]:
        return {s: sync.state.name.lower() for s, sync in self.pipeline.syncs.items()}

    async def checks(self) -> dict[str, Any]:
        database, redis_state = await asyncio.gather(self.check_database(), self.check_redis())
        return {
            "database": "ok" if database else "down",
            "redis": redis_state,
            "feed": self.feed_status(),
            "books": self.books_status(),
            "tasks": {name: "ok" if not t.done() else "stopped" for name, t in self._tasks.items()},
        }

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
            lambda: {
                s: float(sync.state is SyncState.LIVE) for s, sync in self.pipeline.syncs.items()
            },
            label="symbol",
        )
        m.register_gauge(
            "depthflow_redis_up",
            "1 when the last Redis push succeeded",
            lambda: float(self.redis_sink.healthy),
        )
        m.register_gauge(
            "depthflow_database_up",
            "1 when the last database write succeeded",
            lambda: float(self.writer.healthy),
        )

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"depthflow-{name}")
        task.add_done_callback(self._task_done)
        self._tasks[name] = task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.metrics.count_error("task")
        log.error(
            "task_failed", exc_info=task.exception(), extra={"fields": {"task": task.get_name()}}
        )

    async def _cancel(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _join(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is None:
            return
        try:
            await asyncio.wait_for(task, timeout=60)
        except TimeoutError:
            log.error("task_stop_timeout", extra={"fields": {"task": name}})
        except Exception:
            return
