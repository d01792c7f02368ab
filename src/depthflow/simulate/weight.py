"""Binance's REST request weight, enforced per IP the way Binance's spot API does it.

What Binance documents (spot REST "Limits"), and what this module does:

* Every route has a weight: ``GET /api/v3/depth`` costs 5, 25, 50 or 250 for a ``limit`` up to
  100, 500, 1000 or 5000; ``GET /api/v3/exchangeInfo`` 20; ``ping`` and ``time`` 1.
* Weight is counted per IP and per *fixed* interval, not over a sliding window: "a 1 MINUTE
  interval starts every minute. Request submitted at 00:01:23.456 counts towards the 00:01:00
  minute's limit. Once the 00:02:00 minute starts, the count will reset to zero again." The
  intervals here are aligned on the wall clock (``time.time``) the same way.
* Every answer carries ``X-MBX-USED-WEIGHT-1M``: the weight the IP used in the current interval,
  this request included.
* Over the limit (``REQUEST_WEIGHT`` 6000 a minute): HTTP 429 with ``Retry-After``, the seconds
  until the interval resets. The refused request's weight still counts (Binance's header goes
  past the limit too).
* "Failing to back off after receiving 429s will result in an automated IP ban (HTTP status
  418)", "from 2 minutes to 3 days" for repeat offenders, ``Retry-After`` telling when it ends.
  Here *any* request before a 429's ``Retry-After`` has passed is such a failure: it starts a
  ban of ``ban_base_s`` (120 s), doubling with each further ban of that IP, up to 3 days. During
  a ban every request gets 418 (not counted as weight, not extending the ban). Once the ban is
  over the IP is counted afresh; a 429 still applies if its interval is still over the limit.

So a well-behaved client sees at most one 429 per interval and never a 418.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "EXCHANGE_INFO_WEIGHT",
    "PING_WEIGHT",
    "RETRY_AFTER_HEADER",
    "USED_WEIGHT_HEADER",
    "RateLimiter",
    "RestStats",
    "Verdict",
    "depth_weight",
]

USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
RETRY_AFTER_HEADER = "Retry-After"
INTERVAL_S = 60.0
DEFAULT_WEIGHT_LIMIT = 6000
DEFAULT_BAN_BASE_S = 120.0
MAX_BAN_S = 3 * 86_400.0
EXCHANGE_INFO_WEIGHT = 20
PING_WEIGHT = 1
# (largest limit, weight) of GET /api/v3/depth, as Binance's spot API documents it.
_DEPTH_WEIGHTS = ((100, 5), (500, 25), (1000, 50), (5000, 250))


def depth_weight(limit: int) -> int:
    """The weight of ``GET /api/v3/depth?limit=<limit>``: 5, 25, 50 or 250."""
    for largest, weight in _DEPTH_WEIGHTS:
        if limit <= largest:
            return weight
    return _DEPTH_WEIGHTS[-1][1]  # Binance serves limits above 5000 as 5000


@dataclass(frozen=True)
class Verdict:
    """What to answer a request: ``status`` OK (serve it), 429 or 418.

    ``used``: the IP's weight in the current interval (for ``X-MBX-USED-WEIGHT-1M``);
    ``retry_after``: whole seconds for ``Retry-After`` (429 and 418 only);
    ``banned_until_ms``: epoch milliseconds a 418's ban ends (for its message).
    """

    status: HTTPStatus
    used: int
    retry_after: int | None = None
    banned_until_ms: int | None = None


@dataclass
class _Client:
    interval: int = -1
    used: int = 0
    backoff_until: float = 0.0  # a 429's Retry-After runs out then
    banned_until: float = 0.0
    bans: int = 0
    limited_in_interval: int = 0


@dataclass
class RestStats:
    """What the REST side answered, for tests and benchmarks.

    ``statuses``: count per HTTP status (200, 400, 429, 418, ...) of every weighted route;
    ``requests_by_path``: count per path; ``peak_weight_1m``: the most weight one IP used in one
    interval (refused requests included, so it passes the limit when a 429 was sent);
    ``max_429_per_interval``: the most 429s one IP got in one interval; ``bans``: 418 bans
    started.
    """

    statuses: Counter[int] = field(default_factory=Counter)
    requests_by_path: Counter[str] = field(default_factory=Counter)
    peak_weight_1m: int = 0
    max_429_per_interval: int = 0
    bans: int = 0

    @property
    def ok(self) -> int:
        return self.statuses[HTTPStatus.OK]

    @property
    def rate_limited(self) -> int:
        """429s sent."""
        return self.statuses[HTTPStatus.TOO_MANY_REQUESTS]

    @property
    def banned(self) -> int:
        """418s sent."""
        return self.statuses[HTTPStatus.IM_A_TEAPOT]

    def as_dict(self) -> dict[str, object]:
        return {
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "requests_by_path": dict(self.requests_by_path),
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "banned": self.banned,
            "peak_weight_1m": self.peak_weight_1m,
            "max_429_per_interval": self.max_429_per_interval,
            "bans": self.bans,
        }


class RateLimiter:
    """Binance's per-IP ``REQUEST_WEIGHT`` limit over fixed intervals; see the module doc.

    ``limit`` None only counts (every request is served). ``interval_s`` is Binance's minute;
    shorter ones let tests see a reset quickly (the header keeps Binance's ``-1M`` name).
    """

    def __init__(
        self,
        limit: int | None = DEFAULT_WEIGHT_LIMIT,
        *,
        interval_s: float = INTERVAL_S,
        ban_base_s: float = DEFAULT_BAN_BASE_S,
        max_ban_s: float = MAX_BAN_S,
        clock: Callable[[], float] = time.time,
        stats: RestStats | None = None,
    ) -> None:
        if interval_s <= 0 or ban_base_s <= 0:
            raise ValueError("interval_s and ban_base_s must be positive")
        self.limit = limit
        self.interval_s = interval_s
        self.ban_base_s = ban_base_s
        self.max_ban_s = max_ban_s
        self._clock = clock
        self.stats = stats if stats is not None else RestStats()
        self._clients: dict[str, _Client] = {}

    def admit(self, client: str, weight: int) -> Verdict:
        """Decide on a request of ``weight`` from ``client`` now, and count it."""
        now = self._clock()
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
        interval = math.floor(now / self.interval_s)
        if state.interval != interval:
            state.interval = interval
            state.used = 0
            state.limited_in_interval = 0
        if now < state.banned_until:
            return self._ban_verdict(state, now)
        if now < state.backoff_until:  # ignored a 429's Retry-After
            duration = min(self.ban_base_s * 2**state.bans, self.max_ban_s)
            state.bans += 1
            self.stats.bans += 1
            state.banned_until = now + duration
            state.backoff_until = 0.0
            return self._ban_verdict(state, now)
        state.used += weight
        self.stats.peak_weight_1m = max(self.stats.peak_weight_1m, state.used)
        if self.limit is not None and state.used > self.limit:
            reset = (interval + 1) * self.interval_s
            state.backoff_until = reset
            state.limited_in_interval += 1
            self.stats.max_429_per_interval = max(
                self.stats.max_429_per_interval, state.limited_in_interval
            )
            retry = max(math.ceil(reset - now), 1)
            return Verdict(HTTPStatus.TOO_MANY_REQUESTS, state.used, retry)
        return Verdict(HTTPStatus.OK, state.used)

    def used(self, client: str) -> int:
        """``client``'s weight in the current interval, without counting a request."""
        state = self._clients.get(client)
        if state is None or state.interval != math.floor(self._clock() / self.interval_s):
            return 0
        return state.used

    @staticmethod
    def _ban_verdict(state: _Client, now: float) -> Verdict:
        retry = max(math.ceil(state.banned_until - now), 1)
        until_ms = math.ceil(state.banned_until * 1000)
        return Verdict(HTTPStatus.IM_A_TEAPOT, state.used, retry, until_ms)
