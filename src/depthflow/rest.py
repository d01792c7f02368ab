"""The one scheduler of every Binance REST request of the process.

Binance spot REST limits (https://developers.binance.com/docs/binance-spot-api-docs/rest-api/limits):

- ``REQUEST_WEIGHT`` is 6,000 per minute per IP. Every response carries ``X-MBX-USED-WEIGHT-1M``,
  the IP's use in the current minute, which counts every client on the IP, not only us.
- Intervals are fixed windows: a request at 00:01:23.456 counts towards the 00:01:00 minute, and
  the count starts again from zero at 00:02:00.
- ``GET /api/v3/depth`` weighs 5/25/50/250 for ``limit`` <= 100/500/1000/5000 (a larger limit
  returns 5,000 levels, weight 250); ``GET /api/v3/exchangeInfo`` (no symbol) weighs 20.
- 429: back off for ``Retry-After`` seconds. Ignoring 429s earns 418, an automated IP ban whose
  ``Retry-After`` says how long; bans escalate for repeat offenders from 2 minutes to 3 days.

`RestScheduler` queues requests by priority (`SnapshotReason` order: SYNC, RESYNC, then
exchangeInfo, then AUDIT; FIFO within a priority), keeps at most ``max_concurrency`` in flight on
the one `httpx.AsyncClient`, and never sends a request whose weight would take the estimated use
of the current window above ``weight_per_minute``. After a 429 or 418 it sends nothing at all
until ``Retry-After`` has passed, and the request goes back in the queue at its old place.

The window (what we do, `WeightBudget`):

- The boundary comes from the wall clock (``floor(time.time() / 60)``, the host being NTP-synced
  like Binance); the header going down is not used. A request dispatched within
  ``boundary_margin_s`` of the end of a window may reach Binance in the next one (latency, clock
  skew), so it is charged to both windows.
- The estimate of a window's use is our own weight sent in it plus the largest "outside" use seen
  in it: a header value minus the weight of ours it surely includes (the request itself and those
  that had completed when it was sent). A header higher than our own count is thus trusted, and
  our requests in flight are never forgotten. A header is attributed to the window in which its
  response arrived, if the request was charged to that window; otherwise (a request sent in the
  previous minute) it is dropped, as it may count the old minute.
- A 429 marks the window full: nothing more is sent in it, even once ``Retry-After`` has passed.
- Audits are sent only while the window's use stays below ``audit_fraction`` (50 %) of the budget.

Joining: a `depth()` call for a symbol that is already queued or in flight waits for that request
and gets the same body (a higher priority moves the queued request up). A joining call with a
different ``limit`` is refused with `RestErrorKind.CONFLICT`. When every caller of a queued request
is cancelled, the request is dropped; one in flight runs to its end, its result discarded.

`run()` is the dispatcher: cancel it to stop. Requests in flight when it stops are cancelled and
go back in the queue (their weight stays counted); callers keep waiting, and a new `run()` picks
everything up again. An unexpected error inside the loop is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import email.utils
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from enum import StrEnum

import httpx

from depthflow.accounting import ErrorKind, SnapshotReason
from depthflow.errors import offline_hint, unresolved_host
from depthflow.metrics import Metrics

__all__ = [
    "DEFAULT_BAN_S",
    "DEFAULT_THROTTLE_S",
    "EXCHANGE_INFO_WEIGHT",
    "USED_WEIGHT_HEADER",
    "Charge",
    "Pause",
    "RestError",
    "RestErrorKind",
    "RestScheduler",
    "WeightBudget",
    "depth_weight",
    "parse_retry_after",
    "parse_used_weight",
]

log = logging.getLogger(__name__)

EXCHANGE_INFO_WEIGHT = 20
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
# Pause after a 429 without a usable Retry-After: the rest of a minute at most.
DEFAULT_THROTTLE_S = 60.0
# Pause after a 418 without a usable Retry-After: Binance's shortest ban.
DEFAULT_BAN_S = 120.0
# Binance's longest ban; a larger Retry-After is taken as this.
MAX_PAUSE_S = 3 * 86_400.0
# A Retry-After of 0 (or a date in the past) still pauses this long: never retry at once.
MIN_PAUSE_S = 1.0
# The dispatcher sleeps this long after an unexpected error before going on.
_ERROR_PAUSE_S = 1.0
# Wake a little after a window boundary rather than a little before it.
_BOUNDARY_SLACK_S = 0.001
# Kept of an error body in the RestError message.
_BODY_EXCERPT = 200

_DEPTH = "depth"
_EXCHANGE_INFO = "exchangeInfo"
_RANKS: dict[SnapshotReason, int] = {
    SnapshotReason.SYNC: 0,
    SnapshotReason.RESYNC: 1,
    SnapshotReason.AUDIT: 3,
}
_EXCHANGE_INFO_RANK = 2
_AUDIT_RANK = _RANKS[SnapshotReason.AUDIT]


class RestErrorKind(StrEnum):
    """Why a REST request failed (429 and 418 are not failures: the request waits and retries)."""

    STATUS = "status"  # an HTTP status other than 200, 429 and 418
    TIMEOUT = "timeout"  # the whole request (connect, headers, body) passed request_timeout_s
    TRANSPORT = "transport"  # connection refused or reset, protocol error
    TOO_HEAVY = "too_heavy"  # its weight can never fit the budget (or the audit share of it)
    CONFLICT = "conflict"  # the symbol has a request with another limit queued or in flight
    INTERNAL = "internal"  # a bug in the scheduler


class RestError(Exception):
    """A REST request that gave no usable body."""

    def __init__(self, kind: RestErrorKind, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.status = status
        self.message = message


def depth_weight(limit: int) -> int:
    """The request weight of ``GET /api/v3/depth?limit=...``."""
    if limit < 1:
        raise ValueError(f"depth limit must be >= 1, not {limit}")
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


def parse_retry_after(value: str | None, default: float, now_wall: float | None = None) -> float:
    """Seconds to pause from a ``Retry-After`` header (seconds or an HTTP date), clamped to
    ``[MIN_PAUSE_S, MAX_PAUSE_S]``; ``default`` when it is missing or unreadable."""
    if value is None or not value.strip():
        return default
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return default
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now_wall is None else now_wall)
    if not math.isfinite(seconds):
        return default
    return min(max(seconds, MIN_PAUSE_S), MAX_PAUSE_S)


def parse_used_weight(value: str | None) -> int | None:
    """The integer of an ``X-MBX-USED-WEIGHT-1M`` header; None when missing or unreadable."""
    if value is None:
        return None
    try:
        used = int(value.strip())
    except ValueError:
        return None
    return used if used >= 0 else None


@dataclass(frozen=True, slots=True)
class Charge:
    """What `WeightBudget.charge` recorded for one request: the windows it was charged to and,
    per window, the weight of ours already completed in it when the request was sent."""

    weight: int
    windows: tuple[int, ...]
    completed_before: dict[int, int]


class WeightBudget:
    """The request-weight estimate of fixed windows (pure: every method takes the wall time)."""

    def __init__(
        self, limit: int, *, window_s: float = 60.0, margin_s: float | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"weight limit must be >= 1, not {limit}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, not {window_s}")
        margin = window_s / 30 if margin_s is None else margin_s
        if not 0 <= margin < window_s / 2:
            raise ValueError(f"margin_s must be in [0, window_s / 2), not {margin}")
        self.limit = limit
        self.window_s = window_s
        self.margin_s = margin
        self._sent: dict[int, int] = {}
        self._completed: dict[int, int] = {}
        self._outside: dict[int, int] = {}
        self._full: set[int] = set()

    def window(self, wall: float) -> int:
        return math.floor(wall / self.window_s)

    def windows_for(self, wall: float) -> tuple[int, ...]:
        """The windows a request sent now may be counted in."""
        n = self.window(wall)
        if wall >= (n + 1) * self.window_s - self.margin_s:
            return (n, n + 1)
        return (n,)

    def used_in(self, window: int) -> int:
        """Best estimate of the IP's use in ``window``: ours plus the outside use seen."""
        if window in self._full:
            return max(self.limit, self._sent.get(window, 0))
        return self._sent.get(window, 0) + max(0, self._outside.get(window, 0))

    def used(self, wall: float) -> int:
        return self.used_in(self.window(wall))

    def delay(self, weight: int, ceiling: int, wall: float) -> float:
        """0.0 when a request of ``weight`` may go now without any window it may land in passing
        ``ceiling``; else the seconds to the next window boundary (check again then)."""
        if all(self.used_in(n) + weight <= ceiling for n in self.windows_for(wall)):
            return 0.0
        end = (self.window(wall) + 1) * self.window_s
        return max(end - wall, 0.0) + _BOUNDARY_SLACK_S

    def charge(self, weight: int, wall: float) -> Charge:
        """Record a request sent now."""
        self._prune(self.window(wall))
        windows = self.windows_for(wall)
        completed = {n: self._completed.get(n, 0) for n in windows}
        for n in windows:
            self._sent[n] = self._sent.get(n, 0) + weight
        return Charge(weight, windows, completed)

    def settle(self, charge: Charge, used: int | None, wall: float, *, throttled: bool) -> None:
        """Record the end of a request: its header's use (if any) and whether it got a 429."""
        current = self.window(wall)
        if used is not None and current in charge.windows:
            outside = used - charge.completed_before[current] - charge.weight
            self._outside[current] = max(self._outside.get(current, outside), outside)
        if throttled:
            self._full.add(current)
        for n in charge.windows:
            self._completed[n] = self._completed.get(n, 0) + charge.weight

    def _prune(self, current: int) -> None:
        for table in (self._sent, self._completed, self._outside):
            for n in [n for n in table if n < current - 1]:
                del table[n]
        self._full = {n for n in self._full if n >= current - 1}


class Pause:
    """The pause of every request after a 429 or 418 (pure: every method takes the time)."""

    def __init__(self) -> None:
        self.until = -math.inf

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)

    def extend(self, seconds: float, now: float) -> float:
        """Pause until ``now + seconds`` unless already paused longer; the seconds added."""
        end = now + seconds
        if end <= self.until:
            return 0.0
        added = end - max(now, self.until)
        self.until = end
        return added


class _State(StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DONE = "done"


@dataclass(eq=False, slots=True)
class _Request:
    key: str
    endpoint: str
    path: str
    params: dict[str, str | int]
    weight: int
    limit: int | None
    rank: int
    seq: int
    reason: SnapshotReason | None
    future: asyncio.Future[str]
    state: _State = _State.QUEUED
    waiters: int = 0
    charge: Charge | None = field(default=None)

    @property
    def place(self) -> tuple[int, int]:
        return (self.rank, self.seq)


class RestScheduler:
    """Every Binance REST request of the process goes through one instance of this."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        metrics: Metrics,
        *,
        weight_per_minute: int,
        max_concurrency: int,
        request_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        window_s: float = 60.0,
        boundary_margin_s: float | None = None,
        audit_fraction: float = 0.5,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, not {request_timeout_s}")
        if not 0 < audit_fraction <= 1:
            raise ValueError(f"audit_fraction must be in (0, 1], not {audit_fraction}")
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._metrics = metrics
        self._max_concurrency = max_concurrency
        self._timeout_s = request_timeout_s
        self._clock = clock
        self._wall = wall_clock
        self._budget = WeightBudget(
            weight_per_minute, window_s=window_s, margin_s=boundary_margin_s
        )
        self._audit_fraction = audit_fraction
        self._audit_ceiling = max(1, math.floor(weight_per_minute * audit_fraction))
        self._pause = Pause()
        self._heap: list[tuple[int, int, _Request]] = []
        self._requests: dict[str, _Request] = {}
        self._queued = 0
        self._in_flight: dict[_Request, asyncio.Task[None]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._running = False

    # -- public ------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        """Requests waiting to be sent (not those in flight)."""
        return self._queued

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def used_weight(self) -> int:
        """Best estimate of the IP's weight used in the current window."""
        return self._budget.used(self._wall())

    def limit_to(self, weight_per_minute: int) -> None:
        """Never plan above the exchange's own limit (its exchangeInfo ``REQUEST_WEIGHT``): a
        budget set higher than that would run into 429s, and requests already in flight when
        the 429 comes back can earn a ban."""
        if 0 < weight_per_minute < self._budget.limit:
            log.info(
                "rest_budget_lowered",
                extra={"fields": {"from": self._budget.limit, "to": weight_per_minute}},
            )
            self._budget.limit = weight_per_minute
            self._audit_ceiling = max(1, math.floor(weight_per_minute * self._audit_fraction))

    @property
    def paused_s(self) -> float:
        """Seconds left of the current 429/418 pause (0.0 when not paused)."""
        return self._pause.remaining(self._clock())

    async def depth(self, symbol: str, limit: int, reason: SnapshotReason) -> str:
        """The body of ``GET /api/v3/depth?symbol=...&limit=...``; raises `RestError`."""
        weight = depth_weight(limit)
        symbol = symbol.upper()
        rank = _RANKS[reason]
        self._check_weight(weight, rank, f"depth {symbol} limit={limit}")
        key = f"{_DEPTH}:{symbol}"
        request = self._requests.get(key)
        if request is not None and request.limit != limit:
            raise RestError(
                RestErrorKind.CONFLICT,
                f"depth {symbol}: a request with limit={request.limit} is already {request.state}",
            )
        if request is None:
            request = self._enqueue(
                key,
                _DEPTH,
                "/api/v3/depth",
                {"symbol": symbol, "limit": limit},
                weight,
                limit,
                rank,
                reason,
            )
        elif rank < request.rank:
            self._promote(request, rank, reason)
        return await self._wait(request)

    async def exchange_info(self) -> str:
        """The body of ``GET /api/v3/exchangeInfo`` (all symbols); raises `RestError`."""
        self._check_weight(EXCHANGE_INFO_WEIGHT, _EXCHANGE_INFO_RANK, "exchangeInfo")
        request = self._requests.get(_EXCHANGE_INFO)
        if request is None:
            request = self._enqueue(
                _EXCHANGE_INFO,
                _EXCHANGE_INFO,
                "/api/v3/exchangeInfo",
                {},
                EXCHANGE_INFO_WEIGHT,
                None,
                _EXCHANGE_INFO_RANK,
                None,
            )
        return await self._wait(request)

    async def run(self) -> None:
        """Send queued requests until cancelled."""
        if self._running:
            raise RuntimeError("RestScheduler.run() is already running")
        self._running = True
        try:
            while True:
                try:
                    await self._step()
                except Exception:
                    log.exception("rest_dispatcher_failed")
                    self._metrics.count_error(ErrorKind.INTERNAL)
                    await asyncio.sleep(_ERROR_PAUSE_S)
        finally:
            self._running = False
            await self._abort_in_flight()

    # -- policy --------------------------------------------------------------------------------

    def _check_weight(self, weight: int, rank: int, what: str) -> None:
        ceiling = self._audit_ceiling if rank == _AUDIT_RANK else self._budget.limit
        if weight > ceiling:
            raise RestError(
                RestErrorKind.TOO_HEAVY, f"{what} weighs {weight}, more than the {ceiling} allowed"
            )

    def _delay(self, request: _Request) -> float:
        """Seconds before ``request`` (the head of the queue) may be sent; inf: until woken."""
        paused = self._pause.remaining(self._clock())
        if paused > 0:
            return paused
        if len(self._in_flight) >= self._max_concurrency:
            return math.inf
        ceiling = self._audit_ceiling if request.rank == _AUDIT_RANK else self._budget.limit
        return self._budget.delay(request.weight, ceiling, self._wall())

    # -- queue ---------------------------------------------------------------------------------

    def _enqueue(
        self,
        key: str,
        endpoint: str,
        path: str,
        params: dict[str, str | int],
        weight: int,
        limit: int | None,
        rank: int,
        reason: SnapshotReason | None,
    ) -> _Request:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Mark any exception retrieved: a request whose callers all left may still fail.
        future.add_done_callback(_retrieve)
        request = _Request(
            key, endpoint, path, params, weight, limit, rank, next(self._seq), reason, future
        )
        self._requests[key] = request
        self._push(request)
        return request

    def _push(self, request: _Request) -> None:
        request.state = _State.QUEUED
        self._queued += 1
        heapq.heappush(self._heap, (request.rank, request.seq, request))
        self._wake.set()

    def _promote(self, request: _Request, rank: int, reason: SnapshotReason) -> None:
        # The request joins the end of its new priority; the old heap entry goes stale.
        request.rank = rank
        request.seq = next(self._seq)
        request.reason = reason
        if request.state is _State.QUEUED:
            heapq.heappush(self._heap, (request.rank, request.seq, request))
            self._wake.set()

    def _head(self) -> _Request | None:
        while self._heap:
            rank, seq, request = self._heap[0]
            if request.state is _State.QUEUED and (rank, seq) == request.place:
                return request
            heapq.heappop(self._heap)
        return None

    async def _wait(self, request: _Request) -> str:
        request.waiters += 1
        try:
            # shield: one caller leaving must not cancel the request of the others.
            return await asyncio.shield(request.future)
        finally:
            request.waiters -= 1
            if request.waiters == 0 and request.state is _State.QUEUED:
                self._drop(request)

    def _drop(self, request: _Request) -> None:
        self._queued -= 1
        self._finish(request)
        request.future.cancel()

    def _finish(self, request: _Request) -> None:
        request.state = _State.DONE
        if self._requests.get(request.key) is request:
            del self._requests[request.key]

    # -- dispatch ------------------------------------------------------------------------------

    async def _step(self) -> None:
        # Clear before looking: any change after the look sets the event again.
        self._wake.clear()
        request = self._head()
        delay = math.inf if request is None else self._delay(request)
        if request is not None and delay <= 0:
            self._dispatch(request)
            return
        if math.isinf(delay):
            await self._wake.wait()
            return
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _dispatch(self, request: _Request) -> None:
        # Read the clock before changing anything: if it raises, the request stays queued.
        wall = self._wall()
        heapq.heappop(self._heap)
        self._queued -= 1
        request.state = _State.IN_FLIGHT
        request.charge = self._budget.charge(request.weight, wall)
        self._metrics.count_rest_weight(request.weight)
        self._in_flight[request] = asyncio.create_task(
            self._send(request), name=f"rest:{request.key}"
        )

    async def _send(self, request: _Request) -> None:
        status = "internal"
        try:
            status = await self._exchange(request)
        except asyncio.CancelledError:
            # run() is stopping: the request goes back to its place for the next run().
            status = "cancelled"
            if request.state is _State.IN_FLIGHT:
                self._requeue(request)
            raise
        except Exception as exc:
            log.exception("rest_request_failed", extra={"fields": {"request": request.key}})
            self._fail(request, RestError(RestErrorKind.INTERNAL, repr(exc)))
        finally:
            self._metrics.count_rest_request(request.endpoint, status)
            self._in_flight.pop(request, None)
            self._wake.set()

    async def _exchange(self, request: _Request) -> str:
        """Send ``request`` once and act on the answer; the status label for the metrics."""
        assert request.charge is not None
        url = self._base_url + request.path
        try:
            # One deadline for connect, headers and body: httpx's timeouts are per operation,
            # so a server trickling a byte at a time would never trip them.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.get(url, params=request.params)
        except TimeoutError:
            self._budget.settle(request.charge, None, self._wall(), throttled=False)
            self._fail(
                request,
                RestError(RestErrorKind.TIMEOUT, f"{request.key}: no answer in {self._timeout_s}s"),
            )
            return "timeout"
        except httpx.HTTPError as exc:
            self._budget.settle(request.charge, None, self._wall(), throttled=False)
            message = f"{request.key}: {url}: {exc!r}"
            if unresolved_host(exc):
                message += f"; {offline_hint(url)}"
            self._fail(request, RestError(RestErrorKind.TRANSPORT, message))
            return "transport"
        code = response.status_code
        used = parse_used_weight(response.headers.get(USED_WEIGHT_HEADER))
        self._budget.settle(request.charge, used, self._wall(), throttled=code == 429)
        if code == 200:
            if request.reason is not None:
                self._metrics.count_snapshot(request.reason)
            self._finish(request)
            if not request.future.done():
                request.future.set_result(response.text)
        elif code in (429, 418):
            self._on_limited(request, code, response.headers.get("Retry-After"), used)
        else:
            excerpt = response.text[:_BODY_EXCERPT]
            self._fail(
                request,
                RestError(
                    RestErrorKind.STATUS, f"{request.key}: HTTP {code}: {excerpt}", status=code
                ),
            )
        return str(code)

    def _on_limited(
        self, request: _Request, code: int, retry_after: str | None, used: int | None
    ) -> None:
        banned = code == 418
        seconds = parse_retry_after(
            retry_after, DEFAULT_BAN_S if banned else DEFAULT_THROTTLE_S, self._wall()
        )
        was_paused = self._pause.remaining(self._clock()) > 0
        added = self._pause.extend(seconds, self._clock())
        if banned:
            self._metrics.add_rest_banned(added)
        else:
            self._metrics.add_rest_throttled(added)
        if not was_paused or banned:
            # A ban is always worth a line, even inside a pause: it means we were too late.
            log.warning(
                "rest_banned" if banned else "rest_throttled",
                extra={
                    "fields": {
                        "status": code,
                        "retry_after_s": seconds,
                        "request": request.key,
                        "used_weight": used,
                    }
                },
            )
        # Back to its old place in the queue: it goes out first once the pause is over.
        self._requeue(request)

    def _requeue(self, request: _Request) -> None:
        if request.waiters > 0:
            self._push(request)
        else:
            # Every caller left while it was in flight: nobody wants it any more.
            self._finish(request)
            request.future.cancel()

    def _fail(self, request: _Request, error: RestError) -> None:
        self._finish(request)
        if not request.future.done():
            request.future.set_exception(error)

    async def _abort_in_flight(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _retrieve(future: asyncio.Future[str]) -> None:
    if not future.cancelled():
        future.exception()
