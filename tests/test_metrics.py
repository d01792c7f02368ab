"""Process-local metrics: counters, latency histogram and ring, Prometheus text, /metrics body."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from depthflow.metrics import (
    LATENCY_BUCKETS,
    RING_SIZE,
    Metrics,
    ProcessStats,
    metrics_document,
)

SPEC_KEYS = (
    "average_latency",
    "cpu_usage_percent",
    "memory_usage_percent",
    "error_count",
    "data_loss_count",
    "message_count",
)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render_prometheus().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_local_totals_sum_counters_and_break_them_down(metrics: Metrics) -> None:
    metrics.count_messages(3)
    metrics.count_messages()
    metrics.count_ticks(7)
    metrics.count_error("decode")
    metrics.count_error("decode", 2)
    metrics.count_error("redis")
    metrics.count_loss("gap", 4)
    metrics.count_loss("overflow")
    metrics.count_signal("open")
    metrics.count_signal("close")
    metrics.count_signal("open")
    metrics.count_rows_written("price_ticks", 10)
    metrics.observe_latency(0.5)
    metrics.observe_latency(0.25)

    totals = metrics.local_totals()

    assert totals["message_count"] == 4
    assert totals["tick_count"] == 7
    assert totals["error_count"] == 4
    assert totals["error:decode"] == 3
    assert totals["error:redis"] == 1
    assert totals["data_loss_count"] == 5
    assert totals["data_loss:gap"] == 4
    assert totals["data_loss:overflow"] == 1
    assert totals["signal_count"] == 3
    assert totals["signal:open"] == 2
    assert totals["signal:close"] == 1
    assert totals["rows_written:price_ticks"] == 10
    assert totals["latency_sum"] == pytest.approx(0.75)
    assert totals["latency_count"] == 2


def test_empty_metrics_have_zero_totals(metrics: Metrics) -> None:
    totals = metrics.local_totals()
    for key in ("message_count", "tick_count", "error_count", "data_loss_count", "signal_count"):
        assert totals[key] == 0
    assert not any(":" in key for key in totals)


@pytest.mark.parametrize(
    ("seconds", "slot"),
    [
        (0.0, 0),
        (0.00001, 0),  # equal to the first bound: `le` includes it
        (0.000011, 1),
        (0.003, LATENCY_BUCKETS.index(0.005)),
        (5.0, len(LATENCY_BUCKETS) - 1),
        (5.0001, len(LATENCY_BUCKETS)),  # +Inf
        (120.0, len(LATENCY_BUCKETS)),
    ],
)
def test_latency_lands_in_its_bucket(metrics: Metrics, seconds: float, slot: int) -> None:
    metrics.observe_latency(seconds)
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    expected[slot] = 1
    assert list(metrics.latency_buckets) == expected


def test_batch_and_single_observations_agree() -> None:
    samples = [i * 0.0007 for i in range(50)] + [0.00001, 5.0, 7.0]
    now = 0.0  # so that now - (now - s) == s exactly and bound-equal samples stay put
    single, batch = Metrics(), Metrics()
    for seconds in samples:
        single.observe_latency(seconds)
    batch.observe_latencies([now - s for s in samples], now)

    assert list(batch.latency_buckets) == list(single.latency_buckets)
    assert batch.latency_count == single.latency_count == len(samples)
    assert batch.latency_sum == pytest.approx(single.latency_sum)
    assert batch.latency_percentiles() == pytest.approx(single.latency_percentiles())


def test_small_batch_is_recorded(metrics: Metrics) -> None:
    metrics.observe_latencies([9.0, 9.5], 10.0)
    assert metrics.latency_count == 2
    assert metrics.latency_sum == pytest.approx(1.5)
    assert metrics.latency_percentiles()["max"] == pytest.approx(1.0)


def test_percentiles_are_zero_when_empty(metrics: Metrics) -> None:
    assert metrics.latency_percentiles() == {"p50": 0.0, "p99": 0.0, "max": 0.0}


def test_percentiles_of_known_samples(metrics: Metrics) -> None:
    for i in range(1, 101):
        metrics.observe_latency(i / 1000)
    p = metrics.latency_percentiles()
    assert p["p50"] == pytest.approx(0.0505)
    assert p["p99"] == pytest.approx(0.09901)
    assert p["max"] == pytest.approx(0.1)


def test_ring_keeps_only_the_newest_samples(metrics: Metrics) -> None:
    # An old slow sample must leave the window once RING_SIZE newer samples arrived.
    metrics.observe_latency(3.0)
    metrics.observe_latencies([0.0] * RING_SIZE, 0.001)
    assert metrics.latency_percentiles()["max"] == pytest.approx(0.001)
    # A batch bigger than the ring keeps its own tail.
    metrics.observe_latencies([1.0] * (RING_SIZE + 5) + [0.0] * 10, 2.0)
    p = metrics.latency_percentiles()
    assert p["max"] == pytest.approx(2.0)
    assert p["p50"] == pytest.approx(1.0)
    assert metrics.latency_count == 1 + RING_SIZE + RING_SIZE + 15


def test_registry_is_the_apps_own(metrics: Metrics) -> None:
    assert metrics.registry is not REGISTRY
    assert metrics.registry is not Metrics().registry
    names = {family.name for family in REGISTRY.collect()}
    assert not any(name.startswith("depthflow_") for name in names)


def test_prometheus_exposes_the_counters(metrics: Metrics) -> None:
    metrics.count_messages(5)
    metrics.count_ticks(4)
    metrics.count_error("decode", 2)
    metrics.count_loss("gap", 3)
    metrics.count_signal("open")
    metrics.count_rows_written("orders", 40)

    samples = _samples(metrics)

    assert samples[("depthflow_messages_total", ())] == 5
    assert samples[("depthflow_ticks_total", ())] == 4
    assert samples[("depthflow_errors_total", (("kind", "decode"),))] == 2
    assert samples[("depthflow_data_loss_total", (("reason", "gap"),))] == 3
    assert samples[("depthflow_signals_total", (("signal", "open"),))] == 1
    assert samples[("depthflow_rows_written_total", (("table", "orders"),))] == 40
    assert samples[("depthflow_cpu_usage_percent", ())] >= 0.0
    assert 0.0 < samples[("depthflow_memory_usage_percent", ())] <= 100.0


def test_prometheus_names_follow_the_conventions(metrics: Metrics) -> None:
    text = metrics.render_prometheus().decode()
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("depthflow_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds")


def test_prometheus_histogram_is_cumulative(metrics: Metrics) -> None:
    metrics.observe_latency(0.00002)
    metrics.observe_latency(0.003)
    metrics.observe_latency(0.004)
    metrics.observe_latency(9.0)

    samples = _samples(metrics)

    def bucket(le: str) -> float:
        return samples[("depthflow_latency_seconds_bucket", (("le", le),))]

    assert bucket("1e-05") == 0
    assert bucket("2.5e-05") == 1
    assert bucket("0.0025") == 1
    assert bucket("0.005") == 3
    assert bucket("5.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("depthflow_latency_seconds_count", ())] == 4
    assert samples[("depthflow_latency_seconds_sum", ())] == pytest.approx(9.00702)


def test_registered_gauges_are_read_at_scrape_time(metrics: Metrics) -> None:
    state = {"rows": 1.0}
    metrics.register_gauge("depthflow_buffered_rows", "Rows waiting.", lambda: state["rows"])
    metrics.register_gauge(
        "depthflow_book_in_sync",
        "1 when the book is in sync.",
        lambda: {"btcusdt": 1.0, "ethusdt": 0.0},
        label="symbol",
    )
    state["rows"] = 42.0

    samples = _samples(metrics)

    assert samples[("depthflow_buffered_rows", ())] == 42.0
    assert samples[("depthflow_book_in_sync", (("symbol", "btcusdt"),))] == 1.0
    assert samples[("depthflow_book_in_sync", (("symbol", "ethusdt"),))] == 0.0


def test_a_failing_gauge_leaves_the_rest_of_the_scrape(metrics: Metrics) -> None:
    def broken() -> float:
        raise RuntimeError("boom")

    metrics.register_gauge("depthflow_broken", "Always fails.", broken)
    metrics.count_messages(2)

    samples = _samples(metrics)

    assert samples[("depthflow_messages_total", ())] == 2
    assert not any(name == "depthflow_broken" for name, _ in samples)


def test_gauge_names_are_checked(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="depthflow_"):
        metrics.register_gauge("buffered_rows", "x", lambda: 0.0)
    metrics.register_gauge("depthflow_x", "x", lambda: 0.0)
    with pytest.raises(ValueError, match="already"):
        metrics.register_gauge("depthflow_x", "x", lambda: 1.0)


def test_process_stats_read_this_process() -> None:
    stats = ProcessStats()
    assert stats.cpu_percent() >= 0.0
    assert 0.0 < stats.memory_percent() <= 100.0
    assert stats.rss_bytes() > 1_000_000


def test_metrics_document_has_numeric_spec_keys(metrics: Metrics) -> None:
    metrics.count_messages(10)
    metrics.count_error("decode", 2)
    metrics.count_loss("gap")
    metrics.count_signal("open")
    metrics.count_ticks(8)
    metrics.observe_latency(0.002)
    metrics.observe_latency(0.004)

    doc = metrics_document(metrics.local_totals(), metrics.process, metrics.latency_percentiles())

    for key in SPEC_KEYS:
        value = doc[key]  # type: ignore[literal-required]
        assert isinstance(value, int | float)
        assert not isinstance(value, bool)
        assert math.isfinite(value)
    assert doc["average_latency"] == pytest.approx(0.003)
    assert doc["message_count"] == 10
    assert doc["error_count"] == 2
    assert doc["data_loss_count"] == 1
    assert doc["tick_count"] == 8
    assert doc["signal_count"] == 1
    assert doc["errors"] == {"decode": 2}
    assert doc["data_loss"] == {"gap": 1}
    assert doc["signals"] == {"open": 1}
    assert doc["latency_p50"] == pytest.approx(0.003)
    assert doc["latency_p99"] == pytest.approx(0.00398)


def test_metrics_document_without_latency_is_zero(metrics: Metrics) -> None:
    doc = metrics_document(metrics.local_totals(), metrics.process, metrics.latency_percentiles())
    assert doc["average_latency"] == 0.0
    assert doc["errors"] == {}
