"""Shared counters in Redis: every process adds its deltas to one hash, so they sum.

The hash `<prefix>counters` has the fields of `Metrics.local_totals()` (`message_count`,
`error:<kind>`, ...). Each process pushes only what changed since its last successful push, in one
MULTI/EXEC pipeline per flush interval; while Redis is away the deltas keep growing locally and are
added in one go when it is back.

Create the client with short timeouts and few retries (see `create_client`): redis-py's default of
10 retries with backoff would hold a flush or a `/metrics` request for seconds on a dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from depthflow.accounting import ErrorKind
from depthflow.metrics import Metrics

__all__ = ["COUNTERS_KEY", "RedisSink", "create_client"]

log = logging.getLogger(__name__)

COUNTERS_KEY = "counters"
_READ_TTL_S: Final = 0.1
# Pushed with HINCRBYFLOAT; every other field is an integer counter (HINCRBY).
_FLOAT_FIELDS = frozenset({"latency_sum"})
# Redis failures that mean "away"; OSError covers sockets errors redis-py does not wrap.
_REDIS_DOWN = (RedisError, OSError, TimeoutError)


def create_client(url: str, *, timeout: float = 1.0) -> aioredis.Redis | None:
    """A client for `url` that gives up within about `timeout` s per attempt; None when `url` is
    empty (no Redis configured: counters stay in the process)."""
    if not url:
        return None
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One quick retry covers a dropped pooled connection without stalling on a dead server.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        health_check_interval=30,
    )


class RedisSink:
    """Flushes the deltas of a `Metrics` into Redis and reads back the shared totals.

    `client` None means no Redis: nothing is pushed and `totals()` is the local counters.
    """

    def __init__(
        self,
        client: aioredis.Redis | None,
        metrics: Metrics,
        *,
        prefix: str,
        flush_interval: float,
        op_timeout: float = 2.0,
        stop_timeout: float = 1.0,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._key = prefix + COUNTERS_KEY
        self._interval = flush_interval
        # A hard cap per Redis call on top of the client's socket timeouts and retries.
        self._op_timeout = op_timeout
        self._stop_timeout = stop_timeout
        self._pushed: dict[str, float] = {}  # local_totals() as of the last successful push
        # Serialises push and totals: a HGETALL between a push's EXEC and the update of
        # `_pushed` would count that push's deltas twice.
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._healthy: bool | None = None  # None: no attempt yet
        # /metrics may be polled hundreds of times a second: concurrent callers share one HGETALL,
        # and its result (with the `_pushed` it matches) serves for `_READ_TTL_S`.
        self._read: tuple[float, dict[str, float], dict[str, float]] | None = None
        self._reading: asyncio.Future[tuple[dict[str, float], dict[str, float]] | None] | None = (
            None
        )

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def healthy(self) -> bool:
        """True when the last Redis push, ping or read succeeded; always False without a client."""
        return self._client is not None and self._healthy is True

    async def run(self) -> None:
        """Push the deltas now and every `flush_interval` seconds until `stop()`."""
        while not self._stopping.is_set():
            if self.enabled:
                await self.push()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def stop(self) -> None:
        """Make `run()` return, after one last push bounded by `stop_timeout`."""
        self._stopping.set()
        if not self.enabled:
            return
        try:
            await asyncio.wait_for(self.push(), self._stop_timeout)
        except TimeoutError:
            self._failed("push", TimeoutError("final push timed out"))

    async def push(self) -> bool:
        """Add this process's deltas since the last successful push to the shared hash, in one
        transaction. False (deltas kept for the next push) when Redis is away or disabled."""
        if self._client is None:
            return False
        async with self._lock:
            snapshot = self._metrics.local_totals()
            deltas = self._deltas(snapshot)
            if not deltas:
                # Nothing to add: still check Redis so `healthy` stays current.
                return await self.ping()
            try:
                await self._send(self._client, deltas)
            except _REDIS_DOWN as exc:
                self._failed("push", exc)
                return False
            self._pushed = snapshot
            self._read = None  # the shared hash just changed
            self._succeeded()
            return True

    async def totals(self) -> dict[str, float]:
        """Counters summed over every process sharing the prefix, including this process's
        not-yet-pushed deltas; this process's `local_totals()` when Redis is away or disabled."""
        if self._client is None:
            return self._metrics.local_totals()
        read = await self._shared_read()
        local = self._metrics.local_totals()
        if read is None:
            return local
        shared, pushed = read
        # `shared` holds exactly `pushed` of this process's counts, so adding the rest is exact.
        totals = dict(shared)
        for field, value in local.items():
            totals[field] = totals.get(field, 0.0) + value - pushed.get(field, 0.0)
        return totals

    async def _shared_read(self) -> tuple[dict[str, float], dict[str, float]] | None:
        now = time.monotonic()
        if self._read is not None and now - self._read[0] < _READ_TTL_S:
            return self._read[1], self._read[2]
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._hgetall())
            self._reading.add_done_callback(self._read_done)
        return await asyncio.shield(self._reading)

    def _read_done(
        self, future: asyncio.Future[tuple[dict[str, float], dict[str, float]] | None]
    ) -> None:
        self._reading = None

    async def _hgetall(self) -> tuple[dict[str, float], dict[str, float]] | None:
        assert self._client is not None
        async with self._lock:
            try:
                async with asyncio.timeout(self._op_timeout):
                    raw = await self._client.hgetall(self._key)
            except _REDIS_DOWN as exc:
                self._failed("read", exc)
                return None
            self._succeeded()
            shared = {_text(field): float(value) for field, value in raw.items()}
            self._read = (time.monotonic(), shared, dict(self._pushed))
            return shared, self._read[2]

    async def ping(self) -> bool:
        """Whether Redis answers now; updates `healthy`. False when disabled."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.ping()
        except _REDIS_DOWN as exc:
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    def _deltas(self, snapshot: dict[str, float]) -> dict[str, float]:
        deltas: dict[str, float] = {}
        for field, value in snapshot.items():
            delta = value - self._pushed.get(field, 0)
            if delta:
                deltas[field] = delta
        return deltas

    async def _send(self, client: aioredis.Redis, deltas: dict[str, float]) -> None:
        async with asyncio.timeout(self._op_timeout):
            # MULTI/EXEC: all fields move together, so readers never see half a flush.
            async with client.pipeline(transaction=True) as pipe:
                for field, delta in deltas.items():
                    if field in _FLOAT_FIELDS:
                        pipe.hincrbyfloat(self._key, field, delta)
                    else:
                        pipe.hincrby(self._key, field, int(delta))
                await pipe.execute()

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._metrics.count_error(ErrorKind.REDIS)
        if self._healthy is not False:
            # One line when Redis goes away, not one per attempt.
            log.warning(
                "redis_unavailable",
                extra={"fields": {"operation": operation, "error": repr(exc), "key": self._key}},
            )
        self._healthy = False

    def _succeeded(self) -> None:
        if self._healthy is False:
            log.info("redis_restored", extra={"fields": {"key": self._key}})
        self._healthy = True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
