"""Prometheus exposition of `Metrics`: metric families built from the counters at scrape time.

Nothing here runs on the hot path; a scrape reads the plain counters and builds the families.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from depthflow.metrics import Metrics

__all__ = ["Collector", "Gauge", "GaugeReader"]

log = logging.getLogger(__name__)

GaugeReader = Callable[[], float | Mapping[str, float]]


@dataclass(frozen=True, slots=True)
class Gauge:
    """A gauge read at scrape time (see `Metrics.register_gauge`)."""

    name: str
    documentation: str
    read: GaugeReader
    label: str | None


class Collector:
    """Builds the metric families from a `Metrics` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield _counter("depthflow_messages", "Websocket frames received.", m.messages)
        yield _counter("depthflow_ticks", "Ticks (WAP computed) produced.", m.ticks)
        yield _labelled("depthflow_errors", "Errors by kind.", "kind", m.errors)
        yield _labelled("depthflow_data_loss", "Data lost, by reason.", "reason", m.data_loss)
        yield _labelled("depthflow_signals", "Trading signals by kind.", "signal", m.signals)
        yield _labelled("depthflow_rows_written", "Rows written by table.", "table", m.rows_written)
        yield _labelled(
            "depthflow_resyncs", "Books discarded and resynced, by reason.", "reason", m.resyncs
        )
        yield _labelled(
            "depthflow_book_audits",
            "Book audits (a fresh snapshot against the live book), by result.",
            "result",
            m.audits,
        )
        yield _labelled(
            "depthflow_task_restarts",
            "Supervised tasks restarted after ending unexpectedly.",
            "task",
            m.task_restarts,
        )
        yield _counter(
            "depthflow_rest_weight_used", "REST request weight sent.", m.rest_weight_used
        )
        yield _labelled_pairs(
            "depthflow_rest_requests",
            "REST requests by endpoint and outcome (HTTP status, timeout, transport).",
            ("endpoint", "status"),
            m.rest_requests,
        )
        yield _labelled(
            "depthflow_snapshots", "REST snapshots received, by reason.", "reason", m.snapshots
        )
        yield _counter(
            "depthflow_rest_throttled_seconds",
            "Seconds every REST request was paused after a 429.",
            m.rest_throttled_seconds,
        )
        yield _counter(
            "depthflow_rest_banned_seconds",
            "Seconds every REST request was paused after a 418 (IP ban).",
            m.rest_banned_seconds,
        )
        yield self._latency()
        yield GaugeMetricFamily(
            "depthflow_cpu_usage_percent", "CPU use of this process.", m.process.cpu_percent()
        )
        yield GaugeMetricFamily(
            "depthflow_memory_usage_percent",
            "Resident memory of this process, percent of the machine.",
            m.process.memory_percent(),
        )
        # A copy: a gauge registered during a scrape must not break the iteration.
        for gauge in tuple(m.gauges.values()):
            family = _read_gauge(gauge)
            if family is not None:
                yield family

    def _latency(self) -> HistogramMetricFamily:
        m = self._m
        cumulative = np.cumsum(m.latency_buckets)
        bounds = [*(repr(b) for b in m.latency_bounds), "+Inf"]
        return HistogramMetricFamily(
            "depthflow_latency_seconds",
            "Frame receipt to rows handed to the writer.",
            buckets=[(le, float(c)) for le, c in zip(bounds, cumulative, strict=True)],
            sum_value=m.latency_sum,
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    # CounterMetricFamily appends `_total` itself; passing the bare name exposes `<name>_total`.
    return CounterMetricFamily(name, documentation, value=value)


def _labelled(
    name: str, documentation: str, label: str, counts: Mapping[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


def _labelled_pairs(
    name: str,
    documentation: str,
    labels: tuple[str, str],
    counts: Mapping[tuple[str, str], int],
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for key, value in sorted(counts.items()):
        family.add_metric(list(key), value)
    return family


def _read_gauge(gauge: Gauge) -> GaugeMetricFamily | None:
    try:
        value = gauge.read()
    except Exception:
        # A broken reader must not take the whole scrape down with it; the gauge is left out.
        log.exception("gauge_read_failed", extra={"fields": {"gauge": gauge.name}})
        return None
    if not isinstance(value, Mapping):
        return GaugeMetricFamily(gauge.name, gauge.documentation, value=float(value))
    if gauge.label is None:
        log.error("gauge_without_label", extra={"fields": {"gauge": gauge.name}})
        return None
    family = GaugeMetricFamily(gauge.name, gauge.documentation, labels=[gauge.label])
    for key, item in sorted(value.items()):
        family.add_metric([key], float(item))
    return family
