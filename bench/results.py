"""Typed results: named targets with their measured value, JSON files, markdown tables."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import Environment

__all__ = [
    "LOG_DIR",
    "OUT_DIR",
    "Percentiles",
    "Target",
    "conclude",
    "markdown_table",
    "ms",
    "print_targets",
    "write_result",
]

OUT_DIR = Path(__file__).resolve().parent / "out"
LOG_DIR = OUT_DIR / "logs"


@dataclass(frozen=True)
class Target:
    """One goal of the issue, e.g. ``Target("throughput_vs_floor", ">= 0.85", 0.91, True)``."""

    name: str
    target: str
    value: float
    met: bool

    @classmethod
    def at_least(cls, name: str, value: float, bound: float) -> Target:
        return cls(name, f">= {bound:g}", value, value >= bound)

    @classmethod
    def at_most(cls, name: str, value: float, bound: float) -> Target:
        return cls(name, f"<= {bound:g}", value, value <= bound)

    @classmethod
    def below(cls, name: str, value: float, bound: float) -> Target:
        return cls(name, f"< {bound:g}", value, value < bound)

    @classmethod
    def holds(cls, name: str, ok: bool) -> Target:
        return cls(name, "true", float(ok), ok)


@dataclass(frozen=True)
class Percentiles:
    """Nearest-rank percentiles of a sample (NaN when it is empty)."""

    n: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(0, math.nan, math.nan, math.nan)
        ordered = sorted(values)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

        return cls(len(ordered), at(0.5), at(0.99), ordered[-1])


def ms(seconds: float) -> str:
    """Milliseconds, three significant digits (sub-millisecond latencies matter here)."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.3g} ms"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numeric columns right-aligned."""
    numeric = [
        any(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_targets(targets: Sequence[Target]) -> None:
    rows = [[t.name, t.target, t.value, "met" if t.met else "NOT MET"] for t in targets]
    print(markdown_table(["target", "goal", "measured", "verdict"], rows))


def conclude(tool: str, targets: Sequence[Target], result: object) -> Path:
    """The end of every tool's run: its targets as a table, then the JSON file (its path)."""
    print()
    print_targets(targets)
    path = write_result(tool, targets, result)
    print(f"\n(result written to {path})")
    return path


def write_result(tool: str, targets: Sequence[Target], result: object) -> Path:
    """``bench/out/<tool>-<UTC time>.json``: environment, targets, then the typed result."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = OUT_DIR / f"{tool}-{stamp}.json"
    document = {
        "tool": tool,
        "environment": dataclasses.asdict(Environment()),
        "targets": _plain(list(targets)),
        "result": _plain(result),
    }
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path


def _plain(value: Any) -> Any:
    """JSON-ready: dataclasses as dicts (their properties too), NaN and inf as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in dir(type(value)):
            if isinstance(getattr(type(value), name, None), property):
                out[name] = _plain(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
