"""The benchmarks' JSON: every target named with its goal, measured value and verdict."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import results
from bench.results import Percentiles, Target


@dataclass(frozen=True)
class Run:
    events: int
    seconds: float
    latency: Percentiles

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def test_targets_say_whether_they_are_met() -> None:
    assert Target.at_least("ratio", 0.91, 0.85) == Target("ratio", ">= 0.85", 0.91, True)
    assert not Target.at_least("ratio", 0.84, 0.85).met
    assert Target.below("stall_s", 0.05, 0.05).met is False
    assert Target.at_most("cpu_us", 35.0, 35).met is True
    assert Target.holds("committed", False) == Target("committed", "true", 0.0, False)


def test_percentiles_are_nearest_rank() -> None:
    p = Percentiles.of([float(v) for v in range(1, 201)])
    assert (p.n, p.p50, p.p99, p.max) == (200, 100.0, 198.0, 200.0)
    assert math.isnan(Percentiles.of([]).p99)


def test_the_json_names_targets_and_keeps_computed_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "OUT_DIR", tmp_path)
    run = Run(events=60_000, seconds=4.0, latency=Percentiles.of([]))
    targets = [Target.at_least("throughput_vs_floor", 0.91, 0.85)]
    path = results.write_result("throughput", targets, run)
    document = json.loads(path.read_text())
    assert path.parent == tmp_path
    assert document["targets"] == [
        {"name": "throughput_vs_floor", "target": ">= 0.85", "value": 0.91, "met": True}
    ]
    assert document["result"]["events_per_s"] == 15_000.0
    assert document["result"]["latency"] == {"n": 0, "p50": None, "p99": None, "max": None}
    assert document["environment"]["cpus"] >= 1
