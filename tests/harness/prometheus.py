"""``GET /prometheus`` of a running service, parsed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "parse", "prometheus", "scrape"]


@dataclass(frozen=True)
class Samples:
    """Every sample of one exposition, and when its answer arrived (``time.time()``)."""

    at: float
    samples: tuple[tuple[str, Mapping[str, str], float], ...]  # (name, labels, value)

    def value(self, name: str, default: float = 0.0, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels`` (none: the unlabelled one)."""
        for sample_name, sample_labels, value in self.samples:
            if sample_name == name and dict(sample_labels) == labels:
                return value
        return default

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` of every sample ``name`` carrying ``label``."""
        return {
            labels[label]: value
            for sample_name, labels, value in self.samples
            if sample_name == name and label in labels
        }

    def flat(self) -> dict[str, float]:
        """``{'name{label="v",...}': value}`` (labels sorted; no braces when there are none)."""
        out: dict[str, float] = {}
        for name, labels, value in self.samples:
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            out[f"{name}{{{text}}}" if text else name] = value
        return out


def parse(text: str, at: float | None = None) -> Samples:
    return Samples(
        at=time.time() if at is None else at,
        samples=tuple(
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ),
    )


async def scrape(client: httpx.AsyncClient) -> Samples:
    """GET ``/prometheus`` of the service ``client`` is based on."""
    response = (await client.get("/prometheus")).raise_for_status()
    return parse(response.text, time.time())


async def prometheus(client: httpx.AsyncClient) -> dict[str, float]:
    """``/prometheus`` samples as ``{'name{label="v"}': value}`` (labels in the key only if any)."""
    return (await scrape(client)).flat()
