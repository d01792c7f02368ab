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
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.accounting import CheckState, LossReason, RunStatus, SnapshotReason
from depthflow.config import Settings
from depthflow.events import decode_snapshot
from depthflow.feed import Feed, FeedState, Tap
from depthflow.live_view import GapTap, LiveView
from depthflow.looplag import LoopLag
from depthflow.metrics import Metrics, ProcessStats
from depthflow.pipeline import Pipeline
from depthflow.redis_sink import RedisSink, create_client
from depthflow.rest import RestError, RestScheduler
from depthflow.signals import Analytics
from depthflow.storage.db import make_engine
from depthflow.storage.edges import stored_edges
from depthflow.storage.maintenance import maintain_partitions, prune_batch_markers
from depthflow.storage.runs import RunRecorder, RunSource
from depthflow.storage.writer import BatchWriter
from depthflow.supervisor import Supervisor
from depthflow.symbols import (
    SymbolsError,
    is_pattern,
    listed_symbols,
    request_weight_per_minute,
    resolve,
)

__all__ = ["Checks", "Service"]

log = logging.getLogger(__name__)

# A health probe must answer fast even when a dependency hangs.
_PROBE_TIMEOUT_S = 1.0
# The checker refreshes the shared result this often; probes read it, never the dependencies.
_CHECK_INTERVAL_S = 0.5
# A result older than this means the checker itself is stuck: say so rather than trust it.
_CHECK_MAX_AGE_S = 3.0
# Inside compose's 40 s stop_grace_period: the writer's final flush gets about 30 s of it.
_SHUTDOWN_BUDGET_S = 35.0
# A stop step still running after this long is worth a line saying what the shutdown waits for.
_STOP_STEP_REPORT_S = 1.0
# Allocations between two young collections (CPython's default: 700).
_GC_GEN0_THRESHOLD = 10_000
# A loop that has not run for this long gets its stack logged (`event_loop_stalled`).
_LOOP_STALL_REPORT_S = 0.25
_RESTORE_RETRY_MAX_S = 30.0
_MAINTENANCE_INTERVAL_S = 3600.0
# How long an audit snapshot may wait for the live book to reach its update id.
_AUDIT_WAIT_S = 10.0


@dataclass(slots=True)
class Checks:
    """One health-check result, shared by every /health, /ready and /live request."""

    at: float  # monotonic time it was computed
    database: CheckState = CheckState.OK
    redis: CheckState = CheckState.DISABLED


class Service:
    """Every long-lived object of one depthflow process."""

    def __init__(
        self,
        settings: Settings,
        *,
        with_feed: bool = True,
        tap: Tap | None = None,
        on_fatal: Callable[[str], None] | None = None,
        owns_process: bool = False,
        run_source: RunSource | None = None,
    ):
        """``owns_process``: this service is the process's whole job (``serve``, ``replay``),
        so it may tune process-wide state such as the garbage collector (`tune_gc`).
        ``run_source``: what the ``runs`` row says the rows come from (default: live)."""
        self.settings = settings
        self._owns_process = owns_process
        self.metrics = Metrics()
        self.process_stats: ProcessStats = self.metrics.process
        # The API's engine: every query under a statement timeout, so a lock or a slow plan
        # answers 503 instead of holding a pooled connection (the writer's engine has none).
        self.engine: AsyncEngine = make_engine(
            settings.database_url, statement_timeout_ms=settings.api_statement_timeout_ms
        )
        self._writer_engine = make_engine(
            settings.database_url, pool_size=settings.write_connections, pre_ping=False
        )
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
            partition_days=settings.partition_days,
            connections=settings.write_connections,
        )
        self.loop_lag = LoopLag(stall_report_s=_LOOP_STALL_REPORT_S)
        # What the dashboard (GET /) shows: bounded, in memory, fed where ticks and gaps arise.
        self.live_view = LiveView()
        self.analytics = Analytics(
            sma_short=settings.sma_short,
            sma_long=settings.sma_long,
            writer=self.writer,
            metrics=self.metrics,
            chart=self.live_view,
        )
        # Plain names are followed from the start; patterns join once exchangeInfo resolved them.
        self._symbol_spec = settings.symbols
        self._resolved = False
        names = [s.upper() for s in settings.symbols if not is_pattern(s)]
        self.pipeline = Pipeline(
            names,
            GapTap(self.writer, self.live_view),
            self.analytics,
            self.metrics,
            stale_resync_s=settings.stale_resync_s,
            checkpoint_interval_s=settings.checkpoint_interval_s,
        )
        self.run = RunRecorder(
            self.engine,
            run_source or RunSource(),
            symbols=lambda: sorted(self.pipeline.syncs),
            ranges=self.pipeline.ledger.run_ranges,
        )
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, connect=5.0),
            # The scheduler bounds requests in flight; the pool only needs to hold them.
            limits=httpx.Limits(max_connections=settings.rest_max_concurrency + 2),
        )
        # The one REST scheduler: every snapshot and exchangeInfo request of the process goes
        # through it, inside REST_WEIGHT_PER_MINUTE, pausing everything on a 429 or 418.
        self.rest = RestScheduler(
            self.http,
            settings.binance_rest_url,
            self.metrics,
            weight_per_minute=settings.rest_weight_per_minute,
            max_concurrency=settings.rest_max_concurrency,
            request_timeout_s=settings.snapshot_timeout_s,
        )
        self.feed: Feed | None = (
            Feed(
                settings,
                self.pipeline,
                self.metrics,
                self.rest,
                symbols=names,
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
        except SymbolsError:
            # Already said in one line (symbols_not_listed): a configuration error, not a bug.
            await self.stop()
            raise
        except BaseException:
            log.error("service_start_failed", exc_info=True)
            await self.stop()
            raise

    async def _start(self) -> None:
        sup = self.supervisor
        sup.start("looplag", self.loop_lag.run)
        sup.start("rest", self.rest.run)
        sup.start("writer", self.writer.run)
        sup.start("redis", self.redis_sink.run)
        # Compile the SMA kernel now, so no event ever waits for the JIT.
        await self.analytics.warm_up()
        sup.start("analytics", self.analytics.run)
        await self._refresh_checks()
        sup.start("health", self._check_forever)
        if self.feed is not None:
            await self._resolve_symbols_at_start()
            sup.start("symbols", self._refresh_symbols_forever)
        sup.start("restore", self._restore_edges, oneshot=True)
        sup.start("maintenance", self._maintain_forever)
        sup.start("run", self.run.run)
        if self.feed is not None:
            sup.start("feed", self.feed.run)
            if self.settings.audit_interval_s > 0:
                sup.start("audit", self._audit_forever)
        if self._owns_process:
            tune_gc()
        log.info(
            "service_started",
            extra={
                "fields": {"symbols": list(self.settings.symbols), "feed": self.feed is not None}
            },
        )

    async def stop(self) -> None:
        """Stop in data-flow order so every computed row is flushed before the connections close.

        Each step is isolated (one that fails or hangs is logged and the next runs) and all of
        them share one budget (`_SHUTDOWN_BUDGET_S`).
        """
        sup = self.supervisor
        sup.stop_watching()
        deadline = time.monotonic() + _SHUTDOWN_BUDGET_S
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("feed", lambda: sup.cancel("feed")),
            ("symbols", lambda: sup.cancel("symbols")),
            ("audit", lambda: sup.cancel("audit")),
            ("restore", lambda: sup.cancel("restore")),
            ("health", lambda: sup.cancel("health")),
            ("maintenance", lambda: sup.cancel("maintenance")),
            ("books", self._discard_books),
            ("analytics", self.analytics.stop),
            ("analytics_task", lambda: sup.join("analytics", self._left(deadline))),
            ("writer", lambda: self.writer.stop(timeout=max(1.0, self._left(deadline) - 5))),
            ("writer_task", lambda: sup.join("writer", self._left(deadline))),
            ("run", lambda: sup.cancel("run")),
            ("run_row", self._finish_run),
            ("redis", self.redis_sink.stop),
            ("redis_task", lambda: sup.join("redis", self._left(deadline))),
            ("rest", lambda: sup.cancel("rest")),
            ("http", self.http.aclose),
            ("redis_client", self._close_redis),
            ("engine", self.engine.dispose),
            ("writer_engine", self._writer_engine.dispose),
            ("looplag", lambda: sup.cancel("looplag")),
        ]
        for name, step in steps:
            try:
                async with asyncio.timeout(max(0.1, self._left(deadline))):
                    await self._stop_step(name, step, deadline)
            except Exception:
                log.exception("service_stop_step_failed", extra={"fields": {"step": name}})
        await sup.cancel_all()
        log.info("service_stopped", extra={"fields": self.metrics.local_totals()})

    async def _finish_run(self) -> None:
        status = RunStatus.FAILED if self.fatal is not None else RunStatus.COMPLETED
        await self.run.finish(status)

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    async def _stop_step(
        self, name: str, step: Callable[[], Awaitable[object]], deadline: float
    ) -> None:
        """Run one stop step; one that takes a while says what it waits for and for how long at
        most (`shutdown_waiting`), then how long it took (`shutdown_waited`)."""
        started = time.monotonic()
        task = asyncio.ensure_future(step())
        try:
            done, _ = await asyncio.wait([task], timeout=_STOP_STEP_REPORT_S)
            if not done:
                log.warning(
                    "shutdown_waiting",
                    extra={
                        "fields": {
                            "step": name,
                            "waiting_for": self._stop_waits_for(name),
                            "up_to_s": round(self._left(deadline), 1),
                        }
                    },
                )
                await asyncio.wait([task])
                log.info(
                    "shutdown_waited",
                    extra={
                        "fields": {"step": name, "seconds": round(time.monotonic() - started, 1)}
                    },
                )
            task.result()
        finally:
            if not task.done():
                # The budget ran out (or we are cancelled): the step must not outlive us.
                task.cancel()
                await asyncio.wait([task])

    def _stop_waits_for(self, name: str) -> str:
        if name == "writer":
            rows = self.writer.buffered
            state = "" if self.writer.healthy else ", the database is not answering"
            return f"the writer's last flush of {rows} buffered rows{state}"
        if name == "analytics":
            return f"the SMA kernel on {self.analytics.pending} pending ticks"
        if name == "redis":
            return "the last push of the counters to Redis"
        if name.endswith("_task"):
            return f"the {name.removesuffix('_task')} task to end"
        return f"the {name} to stop"

    async def _discard_books(self) -> None:
        # Events still buffered for a snapshot will never become ticks: count them.
        self.pipeline.reset_all(reason=LossReason.SHUTDOWN)

    async def _close_redis(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def _give_up(self, task: str) -> None:
        self.fatal = task
        self._on_fatal(task)

    # -- symbols -----------------------------------------------------------------------------------

    async def _listed_symbols(self) -> dict[str, str] | None:
        """Symbol -> status from exchangeInfo, or None when it cannot be had now."""
        try:
            body = await self.rest.exchange_info()
            limit = request_weight_per_minute(body)
            if limit is not None:
                self.rest.limit_to(limit)
            return listed_symbols(body)
        except (RestError, msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            log.warning("exchange_info_failed", extra={"fields": {"error": repr(exc)}})
            return None

    async def _resolve_symbols_at_start(self) -> None:
        """A name the exchange does not list stops start-up here, with a line naming it."""
        listed = await self._listed_symbols()
        if listed is None:
            if any(is_pattern(s) for s in self._symbol_spec):
                log.warning("symbols_unresolved", extra={"fields": {"spec": self._symbol_spec}})
            return
        try:
            chosen = resolve(self._symbol_spec, listed)
        except SymbolsError as exc:
            log.critical("symbols_not_listed", extra={"fields": {"symbols": exc.missing}})
            raise
        self._apply_symbols(chosen)
        self._resolved = True

    async def _refresh_symbols_forever(self) -> None:
        resolved = self._resolved or not any(is_pattern(s) for s in self._symbol_spec)
        while True:
            # Until patterns resolved once, retry soon: a pattern alone follows nothing yet.
            await asyncio.sleep(self.settings.symbols_refresh_s if resolved else 5.0)
            listed = await self._listed_symbols()
            if listed is None:
                continue
            self._apply_symbols(resolve(self._symbol_spec, listed, strict=False))
            resolved = True

    def _apply_symbols(self, chosen: list[str]) -> None:
        assert self.feed is not None
        wanted = set(chosen)
        left = self.pipeline.remove_symbols([s for s in self.pipeline.syncs if s not in wanted])
        joined = self.pipeline.add_symbols(chosen)
        if left:
            self.feed.remove_symbols(left)
            log.info("symbols_left", extra={"fields": {"symbols": left}})
        if joined:
            self.feed.add_symbols(joined)
            log.info(
                "symbols_joined",
                extra={"fields": {"count": len(joined), "symbols": joined[:50]}},
            )

    # -- housekeeping ------------------------------------------------------------------------------

    async def _maintain_forever(self) -> None:
        while True:
            try:
                deleted = await prune_batch_markers(self.engine)
                _, dropped = await maintain_partitions(
                    self.engine,
                    partition_days=self.settings.partition_days,
                    retention_days=self.settings.retention_days,
                )
                if dropped:
                    self.writer.partitions.forget()
            except Exception as exc:
                # The database may be away: the next round tries again.
                log.warning("maintenance_failed", extra={"fields": {"error": repr(exc)}})
            else:
                if deleted:
                    log.info("batch_markers_pruned", extra={"fields": {"rows": deleted}})
            await asyncio.sleep(_MAINTENANCE_INTERVAL_S)

    # -- audits ------------------------------------------------------------------------------------

    async def _audit_forever(self) -> None:
        """One audit every AUDIT_INTERVAL_S, round robin over the live books; the scheduler
        sends it only with budget to spare, so audits never delay a sync."""
        turn = 0
        while True:
            await asyncio.sleep(self.settings.audit_interval_s)
            live = [s for s, sync in self.pipeline.syncs.items() if sync.live]
            if not live:
                continue
            symbol = live[turn % len(live)]
            turn += 1
            await self._audit(symbol)

    async def _audit(self, symbol: str) -> None:
        if not self.pipeline.start_audit(symbol):
            return
        try:
            body = await self.rest.depth(symbol, self.settings.snapshot_limit, SnapshotReason.AUDIT)
            snapshot = decode_snapshot(body)
        except (RestError, msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            log.info("audit_skipped", extra={"fields": {"symbol": symbol, "error": repr(exc)}})
            self.pipeline.cancel_audit(symbol)
            return
        if self.pipeline.on_audit_snapshot(symbol, snapshot) is None:
            # The ids meet within an event or two; a symbol that went quiet is skipped.
            await asyncio.sleep(_AUDIT_WAIT_S)
            self.pipeline.cancel_audit(symbol)

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
            # Live, not from the cached result: a book's state is a dict read, and callers act
            # on it at once (wait until live, then send).
            "books": self.books_state(),
            "connections": self.feed.shard_states() if self.feed is not None else {},
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
            "depthflow_event_loop_lag_seconds",
            "How late the last 20 ms timer of the event loop fired",
            lambda: self.loop_lag.last_s,
        )
        m.register_gauge(
            "depthflow_event_loop_lag_max_seconds",
            "The largest event-loop lag of the last minute",
            lambda: self.loop_lag.recent_max(),
        )
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
            lambda: {s: float(sync.live) for s, sync in self.pipeline.syncs.items()},
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
            "depthflow_rest_queue",
            "REST requests waiting to be sent",
            lambda: self.rest.queue_length,
        )
        m.register_gauge(
            "depthflow_rest_used_weight",
            "Estimated REST weight used by the IP in the current minute",
            lambda: self.rest.used_weight,
        )
        m.register_gauge(
            "depthflow_book_time_to_live_seconds",
            "Seconds from its connection's connect to the book going live (latest sync)",
            lambda: dict(self.feed.time_to_live) if self.feed is not None else {},
            label="symbol",
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


def tune_gc() -> None:
    """Keep CPython's cycle collector from stalling the loop.

    Measured at 3,000 events/s (`python -m bench scale`): full collections took 200-300 ms every few
    seconds, most of it re-traversing the ~250k objects that exist from start-up (modules,
    routes, settings) and never die. Frozen, they are skipped; a larger generation-0 threshold
    makes the young collections rarer (each one still cheap: the rows themselves are atomic
    tuples the collector untracks). Process-wide: only for a process that is this service
    (a test suite that starts many services would freeze each one's leftovers for good).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
