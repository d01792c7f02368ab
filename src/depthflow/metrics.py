"""Process-local counters: the hot path only bumps integers here.

Everything slower (Redis, Prometheus, psutil) reads these counters later, in batches.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Metrics"]


class Metrics:
    """Counters of one process. Cheap to update; read by the Redis flusher and the Prometheus
    collector."""

    def __init__(self) -> None:
        self.messages = 0
        self.ticks = 0
        self.errors: Counter[str] = Counter()
        self.data_loss: Counter[str] = Counter()
        self.signals: Counter[str] = Counter()
        self.rows_written: Counter[str] = Counter()
        self.latency_sum = 0.0
        self.latency_count = 0

    def count_messages(self, n: int = 1) -> None:
        self.messages += n

    def count_error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] += n

    def count_loss(self, reason: str, n: int = 1) -> None:
        self.data_loss[reason] += n

    def count_signal(self, signal: str) -> None:
        self.signals[signal] += 1

    def count_rows_written(self, table: str, n: int) -> None:
        self.rows_written[table] += n

    def observe_latency(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
