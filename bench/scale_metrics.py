"""What `python -m bench scale` reads from serve's ``/prometheus``, and the weight budget's
lower bound on the time until every book is live."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from depthflow.rest import EXCHANGE_INFO_WEIGHT
from tests.harness import prometheus

__all__ = [
    "WINDOW_S",
    "Sample",
    "delta",
    "fixed_window_bound_s",
    "lower_bound_s",
    "sample",
    "weight_per_window",
]

WINDOW_S = 60.0  # Binance's (and the simulator's) fixed weight minute


@dataclass(frozen=True)
class Sample:
    """What one ``/prometheus`` answer says about the sync and the REST side."""

    at: float
    books: int
    live: int
    weight_total: float
    used_weight: float  # depthflow's estimate of the IP's use in the current minute
    rest_queue: float
    rest: dict[str, float]  # "endpoint status" -> requests
    messages: float
    ticks: float
    rows_written: dict[str, float]
    data_loss: dict[str, float]
    errors: dict[str, float]
    resyncs: dict[str, float]
    snapshots: dict[str, float]
    buffered_rows: float
    throttled_s: float
    banned_s: float
    loop_lag_max_s: float  # the service's own largest event-loop lag of the last minute
    time_to_live: dict[str, float] = field(default_factory=dict)

    def statuses(self, status: str) -> float:
        """REST answers with HTTP ``status``, every endpoint."""
        return sum(v for k, v in self.rest.items() if k.endswith(f" {status}"))


async def sample(client: httpx.AsyncClient) -> Sample:
    s = await prometheus.scrape(client)
    in_sync = s.by_label("depthflow_book_in_sync", "symbol")
    rest = {
        f"{labels['endpoint']} {labels['status']}": value
        for name, labels, value in s.samples
        if name == "depthflow_rest_requests_total"
    }
    return Sample(
        at=s.at,
        books=len(in_sync),
        live=sum(1 for v in in_sync.values() if v == 1.0),
        weight_total=s.value("depthflow_rest_weight_used_total"),
        used_weight=s.value("depthflow_rest_used_weight"),
        rest_queue=s.value("depthflow_rest_queue"),
        rest=rest,
        messages=s.value("depthflow_messages_total"),
        ticks=s.value("depthflow_ticks_total"),
        rows_written=s.by_label("depthflow_rows_written_total", "table"),
        data_loss=s.by_label("depthflow_data_loss_total", "reason"),
        errors=s.by_label("depthflow_errors_total", "kind"),
        resyncs=s.by_label("depthflow_resyncs_total", "reason"),
        snapshots=s.by_label("depthflow_snapshots_total", "reason"),
        buffered_rows=s.value("depthflow_buffered_rows"),
        throttled_s=s.value("depthflow_rest_throttled_seconds_total"),
        banned_s=s.value("depthflow_rest_banned_seconds_total"),
        loop_lag_max_s=s.value("depthflow_event_loop_lag_max_seconds"),
        time_to_live=s.by_label("depthflow_book_time_to_live_seconds", "symbol"),
    )


def weight_per_window(samples: Sequence[Sample]) -> dict[int, float]:
    """Weight depthflow sent per fixed wall-clock minute, from the counter's samples (each
    minute gets the increase up to its last sample: +-one poll at the edges)."""
    last: dict[int, float] = {}
    for s in samples:
        last[math.floor(s.at / WINDOW_S)] = s.weight_total
    out: dict[int, float] = {}
    previous = 0.0
    for window in sorted(last):
        out[window] = last[window] - previous
        previous = last[window]
    return out


def lower_bound_s(
    symbols: int, weight: int, budget: int, extra: int = EXCHANGE_INFO_WEIGHT
) -> float:
    """Seconds the weight budget forces at the least: the first minute's ``budget`` is there at
    once, every further minute adds ``budget``; ``extra`` is the exchangeInfo call at start."""
    total = symbols * weight + extra
    return max(0.0, (total - budget) / budget) * WINDOW_S


def fixed_window_bound_s(
    symbols: int, weight: int, budget: int, first_at: float, extra: int = EXCHANGE_INFO_WEIGHT
) -> float:
    """The same bound on fixed wall-clock minutes, starting at epoch ``first_at``: the last
    minute needed starts ``ceil(total / budget) - 1`` minutes after the first one."""
    windows = math.ceil((symbols * weight + extra) / budget)
    if windows <= 1:
        return 0.0
    return (windows - 1) * WINDOW_S - (first_at % WINDOW_S)


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` per key, the keys that moved only."""
    out = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}
