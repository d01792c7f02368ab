"""Shared counters in Redis: every process adds its deltas to one hash, so they sum.

The hash `<prefix>counters` has the fields of `Metrics.local_totals()` (`message_count`,
`error:<kind>`, ...) plus `started_at`, the unix time (seconds, float) at which the hash was
created: delete the hash to reset the counters, and `started_at` starts again with the next push.

Each process pushes only what changed since its last acknowledged push. A push carries an id, and
one Lua script applies it at most once: `SET <prefix>push:<id> 1 NX EX 86400`, and only when that
succeeds, HSETNX `started_at` and HINCRBY / HINCRBYFLOAT every delta. A push whose reply is lost
(timeout, Redis paused or gone) may still have been applied, so it stays *pending*: it is retried
with the same id and the same deltas until Redis answers, and only then are newer deltas pushed
under a new id. While Redis is away the deltas keep growing locally and are added when it is back.

Create the client with short timeouts and few retries (see `create_client`): redis-py's default of
10 retries with backoff would hold a flush or a `/metrics` request for seconds on a dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError

from depthflow.accounting import ErrorKind
from depthflow.metrics import Metrics

__all__ = ["COUNTERS_KEY", "PUSH_ID_TTL_S", "PUSH_KEY", "STARTED_AT", "RedisSink", "create_client"]

log = logging.getLogger(__name__)

COUNTERS_KEY = "counters"
# `<prefix>push:<id>`: set by the push that applied `<id>`, so a retry of it is a no-op.
PUSH_KEY = "push:"
PUSH_ID_TTL_S: Final = 86_400
# Field of the counters hash: when it was created (unix seconds, float). Not a counter.
STARTED_AT = "started_at"
_READ_TTL_S: Final = 0.1
# Pushed with HINCRBYFLOAT; every other field is an integer counter (HINCRBY).
_FLOAT_FIELDS = frozenset({"latency_sum"})
# Redis failures that mean "away"; OSError covers sockets errors redis-py does not wrap.
_REDIS_DOWN = (RedisError, OSError, TimeoutError)

# KEYS[1] the counters hash, KEYS[2] the push-id key; ARGV[1] the id key's TTL, then one
# (field, "i" | "f", delta) triple per counter. Returns 1 when applied now, 0 when applied before.
_PUSH_SCRIPT: Final = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  redis.call('HSETNX', KEYS[1], 'started_at', now[1] .. '.' .. string.format('%06d', now[2]))
end
for i = 2, #ARGV, 3 do
  if ARGV[i + 1] == 'f' then
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 2])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
return 1
"""
_PUSH_SHA: Final = hashlib.sha1(_PUSH_SCRIPT.encode()).hexdigest()


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
        # Retrying a push is safe: its id makes Redis apply it at most once.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        health_check_interval=30,
    )


@dataclass(frozen=True)
class _Push:
    """One push: Redis applies `deltas` under `id` at most once; `snapshot` is the
    `local_totals()` that `_pushed` becomes once Redis acknowledges it."""

    id: str
    deltas: dict[str, float]
    snapshot: dict[str, float]


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
        self._prefix = prefix
        self._key = prefix + COUNTERS_KEY
        self._interval = flush_interval
        # A hard cap per Redis call on top of the client's socket timeouts and retries.
        self._op_timeout = op_timeout
        self._stop_timeout = stop_timeout
        self._pushed: dict[str, float] = {}  # local_totals() as of the last acknowledged push
        # A push sent without an answer: maybe applied, maybe not; retried as is until answered.
        self._pending: _Push | None = None
        self._sink_id = uuid.uuid4().hex
        self._sequence = 0
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

    @property
    def pending_id(self) -> str | None:
        """Id of the push sent but not acknowledged (retried as is by the next push), if any."""
        return self._pending.id if self._pending is not None else None

    def push_key(self, push_id: str) -> str:
        """The Redis key that marks `push_id` as applied."""
        return self._prefix + PUSH_KEY + push_id

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
        """Add this process's deltas since the last acknowledged push to the shared hash, at most
        once each: first the pending push (same id, same deltas) if there is one, then the deltas
        since. False (deltas kept for the next push) when Redis is away or disabled."""
        if self._client is None:
            return False
        async with self._lock:
            client = self._client
            retried = self._pending is not None
            if self._pending is not None and not await self._send(client, self._pending):
                return False
            snapshot = self._metrics.local_totals()
            deltas = self._deltas(snapshot)
            if not deltas:
                if retried:
                    return True  # the pending push just went through: Redis answers
                # Nothing to add: still check Redis so `healthy` stays current.
                return await self.ping()
            self._sequence += 1
            self._pending = _Push(f"{self._sink_id}:{self._sequence}", deltas, snapshot)
            return await self._send(client, self._pending)

    async def totals(self) -> dict[str, float]:
        """Counters summed over every process sharing the prefix, including this process's
        not-yet-pushed deltas; this process's `local_totals()` when Redis is away or disabled.

        `started_at` (from the shared hash) passes through unchanged: no process has it locally.
        """
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
        """The shared hash and the local snapshot it contains. With a push pending, whether the
        hash already holds it is read in the same MULTI (its id key exists or not), so it is
        counted once either way."""
        assert self._client is not None
        async with self._lock:
            pending = self._pending
            try:
                async with asyncio.timeout(self._op_timeout):
                    async with self._client.pipeline(transaction=True) as pipe:
                        pipe.hgetall(self._key)
                        if pending is not None:
                            pipe.exists(self.push_key(pending.id))
                        replies: list[Any] = await pipe.execute()
            except _REDIS_DOWN as exc:
                self._failed("read", exc)
                return None
            self._succeeded()
            shared = {_text(field): float(value) for field, value in replies[0].items()}
            applied = pending is not None and bool(replies[1])
            pushed = dict(pending.snapshot if pending is not None and applied else self._pushed)
            self._read = (time.monotonic(), shared, pushed)
            return shared, pushed

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

    async def _send(self, client: aioredis.Redis, push: _Push) -> bool:
        """Run the push script for `push`; on an answer (applied now or before) `_pushed`
        becomes its snapshot. On a failure it stays pending, to be retried as is."""
        keys = (self._key, self.push_key(push.id))
        args: list[str | int] = [PUSH_ID_TTL_S]
        for field, delta in push.deltas.items():
            if field in _FLOAT_FIELDS:
                args.extend((field, "f", repr(float(delta))))
            else:
                args.extend((field, "i", int(delta)))
        try:
            async with asyncio.timeout(self._op_timeout):
                try:
                    await client.evalsha(_PUSH_SHA, len(keys), *keys, *args)
                except NoScriptError:
                    await client.eval(_PUSH_SCRIPT, len(keys), *keys, *args)
        except _REDIS_DOWN as exc:
            self._failed("push", exc)
            return False
        self._pushed = push.snapshot
        self._pending = None
        self._read = None  # the shared hash just changed
        self._succeeded()
        return True

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
