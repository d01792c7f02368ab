"""The result of `python -m bench scale` (`bench.scale`), and its table."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.probes import HealthProbe
from bench.pyspy import Profile
from bench.results import Percentiles, Target, markdown_table, ms

__all__ = ["HealthStats", "ScaleResult", "Steady", "SyncPhase", "health_stats", "report"]


@dataclass(frozen=True)
class SyncPhase:
    """From /health's first 200 until every book is live."""

    serve_cpu_s: float
    simulator_cpu_s: float
    machine_busy: float
    rss_at_health: int
    rss_at_live: int


@dataclass(frozen=True)
class Steady:
    """``--duration`` seconds once every book is live."""

    start: float
    end: float
    ticks_stored: int  # price_ticks rows received in the window (counted once flushed)
    ticks_per_s: float  # serve's counters over the window
    frames_per_s: float
    rows_written_per_s: dict[str, float]
    buffered_rows: tuple[float, float]  # the writer's, at the start and at the end
    loop_lag_max_s: float
    serve_cpu_cores: float
    simulator_cpu_cores: float
    postgres_cpu_cores: float
    machine_busy: float
    rss_bytes: int
    books_live_at_end: int
    data_loss: dict[str, float]
    resyncs: dict[str, float]
    errors: dict[str, float]
    py_spy: Profile | None

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def ticks_stored_per_s(self) -> float:
        return self.ticks_stored / self.seconds


@dataclass(frozen=True)
class HealthStats:
    whole_run: Percentiles
    until_all_live: Percentiles
    steady: Percentiles
    errors: int
    skipped: int
    non_200: int


@dataclass(frozen=True)
class ScaleResult:
    symbols: int
    symbols_setting: str
    total_rate: float
    snapshot_limit: int
    snapshot_weight: int
    weight_per_minute: int
    all_live: bool
    books_live_at_end_of_wait: int
    seconds_to_health: float
    seconds_to_all_live_from_spawn: float
    seconds_to_all_live_from_health: float
    first_rest_seen_after_health_s: float
    lower_bound_s: float
    fixed_window_bound_s: float
    book_time_to_live_p50_s: float  # from its shard's connect (serve's gauge)
    book_time_to_live_max_s: float
    rest_requests: dict[str, float]
    http_429: float
    http_418: float
    rest_throttled_s: float
    rest_banned_s: float
    weight_sent_total: float
    weight_per_window: dict[str, float]  # fixed wall-clock minute (epoch // 60) -> weight
    peak_weight_per_minute_counter: float
    peak_weight_per_minute_estimate: float
    snapshots: dict[str, float]
    resyncs: dict[str, float]
    errors: dict[str, float]
    data_loss: dict[str, float]
    sync: SyncPhase
    peak_rss_bytes: int
    health: HealthStats
    steady: Steady | None
    timeline: list[tuple[float, int, int, float, float]]  # s after /health, live, books, weight
    serve_exit_code: int

    @property
    def ratio_to_bound(self) -> float:
        bound = self.lower_bound_s
        return self.seconds_to_all_live_from_health / bound if bound else math.nan

    @property
    def ratio_to_fixed_window_bound(self) -> float:
        bound = self.fixed_window_bound_s
        return self.seconds_to_all_live_from_health / bound if bound else math.nan

    @property
    def serve_cpu_cores_sync(self) -> float:
        span = self.seconds_to_all_live_from_health
        return self.sync.serve_cpu_s / span if span > 0 else math.nan

    def targets(self) -> list[Target]:
        return [
            Target.holds("scale.every_book_live", self.all_live),
            Target.at_most("scale.http_429", self.http_429, 0),
            Target.at_most("scale.http_418", self.http_418, 0),
            Target.at_most(
                "scale.peak_weight_per_minute",
                self.peak_weight_per_minute_counter,
                self.weight_per_minute,
            ),
        ]


def health_stats(health: HealthProbe, live_at: float, steady: Steady | None) -> HealthStats:
    return HealthStats(
        whole_run=health.latencies(),
        until_all_live=health.latencies(end=live_at),
        steady=health.latencies(steady.start, steady.end) if steady else Percentiles.of([]),
        errors=health.errors,
        skipped=health.skipped,
        non_200=sum(1 for s in health.samples if s.status != 200),
    )


def report(r: ScaleResult) -> str:
    mb, st, h = 2**20, r.steady, r.health
    rss = st.rss_bytes if st else r.sync.rss_at_live
    nan = math.nan
    rows: list[list[object]] = [
        ["symbols / events/s offered", f"{r.symbols:,} / {r.total_rate:,.0f}"],
        ["snapshot weight x symbols (+ exchangeInfo 20)",
         f"{r.snapshot_weight} x {r.symbols:,} + 20 = {r.snapshot_weight * r.symbols + 20:,}"],
        ["serve start -> /health 200", f"{r.seconds_to_health:.1f} s"],
        ["/health 200 -> every book live",
         f"{r.seconds_to_all_live_from_health:.1f} s" if r.all_live else
         f"NOT LIVE ({r.books_live_at_end_of_wait}/{r.symbols})"],
        ["lower bound (weight budget, continuous)", f"{r.lower_bound_s:.1f} s"],
        ["ratio to the bound", f"{r.ratio_to_bound:.2f}"],
        ["lower bound on fixed minutes (this run's phase)", f"{r.fixed_window_bound_s:.1f} s"],
        ["ratio to the fixed-minute bound", f"{r.ratio_to_fixed_window_bound:.2f}"],
        ["book time-to-live from its shard's connect p50 / max",
         f"{r.book_time_to_live_p50_s:.1f} / {r.book_time_to_live_max_s:.1f} s"],
        ["429 / 418 received", f"{r.http_429:.0f} / {r.http_418:.0f}"],
        ["peak weight per minute (counter per wall minute)",
         f"{r.peak_weight_per_minute_counter:,.0f}"],
        ["peak weight per minute (depthflow's estimate gauge)",
         f"{r.peak_weight_per_minute_estimate:,.0f}"],
        ["RSS at /health 200 / all live / end", f"{r.sync.rss_at_health / mb:.0f} / "
         f"{r.sync.rss_at_live / mb:.0f} / {rss / mb:.0f} MB"],
        ["RSS per symbol (total / above the /health baseline)",
         f"{rss / r.symbols / 1024:.0f} / "
         f"{(rss - r.sync.rss_at_health) / r.symbols / 1024:.0f} KiB"],
        ["serve CPU while syncing / steady", f"{r.serve_cpu_cores_sync:.2f} / "
         f"{st.serve_cpu_cores if st else nan:.2f} cores"],
        ["simulator CPU steady / machine busy steady",
         f"{st.simulator_cpu_cores if st else nan:.2f} cores / "
         f"{(st.machine_busy if st else nan) * 100:.0f} %"],
        ["/health p50 / p99 / max, whole run",
         f"{ms(h.whole_run.p50)} / {ms(h.whole_run.p99)} / {ms(h.whole_run.max)}"
         f" ({h.whole_run.n:,} requests)"],
        ["/health p99 until all live / steady",
         f"{ms(h.until_all_live.p99)} / {ms(h.steady.p99)}"],
        ["event-loop lag, largest in the last minute (serve's own gauge)",
         ms(st.loop_lag_max_s if st else nan)],
        ["ticks/s stored (steady window)",
         f"{st.ticks_stored_per_s if st else nan:,.0f} over {st.seconds if st else nan:.0f} s"],
        ["ticks/s counted / frames/s received (steady window)",
         f"{st.ticks_per_s if st else nan:,.0f} / {st.frames_per_s if st else nan:,.0f}"],
        ["rows written/s per table (steady window)",
         ", ".join(f"{k} {v:,.0f}" for k, v in (st.rows_written_per_s if st else {}).items())],
        ["writer buffer at start / end of the steady window (rows)",
         " / ".join(f"{v:,.0f}" for v in (st.buffered_rows if st else ()))],
        ["PostgreSQL CPU (steady window)", f"{st.postgres_cpu_cores if st else nan:.2f} cores"],
        ["data loss / resyncs in the steady window",
         f"{(st.data_loss if st else None) or '-'} / {(st.resyncs if st else None) or '-'}"],
    ]  # fmt: skip
    return markdown_table(["measure", "value"], rows)
