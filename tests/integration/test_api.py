"""HTTP routes against a real service (PostgreSQL, Redis), driven in-process."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from depthflow.api import create_app
from depthflow.config import Settings
from depthflow.events import Snapshot
from depthflow.service import Service
from tests.harness import frames
from tests.harness.frames import EVENT_TIME_MS

SPEC_METRICS = (
    "average_latency",
    "cpu_usage_percent",
    "memory_usage_percent",
    "error_count",
    "data_loss_count",
    "message_count",
)


def depth_frame(u: int, bid_qty: float) -> str:
    return frames.depth_frame(u, u, [("100.0", bid_qty)], [("101.0", "2.5")], E=EVENT_TIME_MS + u)


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[FastAPI]:
    # No feed: the test plays the exchange by handing frames to the pipeline itself.
    application = create_app(make_settings(symbols="btcusdt"), with_feed=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def service_of(app: FastAPI) -> Service:
    service: Service = app.state.service
    return service


async def feed_book(service: Service, events: int) -> None:
    service.pipeline.on_snapshot(
        "BTCUSDT", Snapshot(last_update_id=100, bids=[(100.0, 1.0)], asks=[(101.0, 1.0)])
    )
    for u in range(101, 101 + events):
        # A periodic WAP, so the short and long averages keep crossing.
        service.pipeline.on_frame(depth_frame(u, 1.0 + u % 7), 0.0)
    await service.analytics.drain()
    await service.writer.flush()


async def test_health_answers_with_every_check(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] in {"OK", "DEGRADED"}
    assert body["timestamp"].endswith("Z") or "+00:00" in body["timestamp"]
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["feed"] == "disabled"


async def test_ready_is_503_until_every_book_is_in_sync(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    not_ready = await client.get("/ready")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["books"] == {"BTCUSDT": "waiting"}
    await feed_book(service_of(app), 3)
    ready = await client.get("/ready")
    assert ready.status_code == 200, ready.json()


async def test_metrics_has_the_six_numeric_keys(app: FastAPI, client: httpx.AsyncClient) -> None:
    await feed_book(service_of(app), 5)
    service_of(app).pipeline.on_frame("garbage", 0.0)
    await service_of(app).redis_sink.push()
    body = (await client.get("/metrics")).json()
    for key in SPEC_METRICS:
        assert isinstance(body[key], int | float), key
    assert body["message_count"] == 6
    assert body["error_count"] == 1
    assert body["data_loss_count"] == 1
    assert body["average_latency"] > 0


async def test_prometheus_parses_with_the_official_parser(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await feed_book(service_of(app), 4)
    response = await client.get("/prometheus")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert all(name.startswith("depthflow_") for name in families)
    assert families["depthflow_ticks"].type == "counter"
    assert families["depthflow_latency_seconds"].type == "histogram"
    ticks: dict[str, Any] = {s.name: s.value for s in families["depthflow_ticks"].samples}
    assert ticks["depthflow_ticks_total"] == 4


async def test_book_is_the_live_local_book(app: FastAPI, client: httpx.AsyncClient) -> None:
    await feed_book(service_of(app), 2)
    body = (await client.get("/book/BTCUSDT", params={"depth": 5})).json()
    assert body["symbol"] == "BTCUSDT"
    assert body["last_update_id"] == 102
    assert body["bids"] == [[100.0, 1.0 + 102 % 7]]
    assert body["asks"] == [[101.0, 2.5]]
    assert (await client.get("/book/dogeusdt")).status_code == 404


async def test_ticks_and_signals_newest_first(app: FastAPI, client: httpx.AsyncClient) -> None:
    await feed_book(service_of(app), 60)
    ticks = (await client.get("/ticks", params={"symbol": "btcusdt", "limit": 5})).json()
    assert [t["last_update_id"] for t in ticks] == [160, 159, 158, 157, 156]
    assert (await client.get("/ticks", params={"symbol": "ethusdt"})).json() == []
    signals = (await client.get("/signals", params={"limit": 1000})).json()
    assert len(signals) >= 4, "a periodic WAP series must cross its averages"
    ids = [s["last_update_id"] for s in signals]
    assert ids == sorted(ids, reverse=True)
    assert {s["signal"] for s in signals} <= {"open", "close"}
    assert (await client.get("/ticks", params={"limit": 0})).status_code == 422


REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((MONITORING / "grafana/dashboards/depthflow.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\bdepthflow_[a-z_]+", expr)}


def exported_family(name: str, families: dict[str, str]) -> str | None:
    """The exported family a query's series name belongs to (counters lose `_total` in the
    parser's family names, histograms are queried through `_bucket`, `_sum`, `_count`)."""
    for suffix, kind in (("_total", "counter"), ("_bucket", "histogram"), ("_sum", "histogram")):
        base = name.removesuffix(suffix)
        if base != name and families.get(base) == kind:
            return base
    return name if families.get(name) in {"gauge", "histogram"} else None


async def test_grafana_dashboard_queries_only_metrics_the_service_exports(
    client: httpx.AsyncClient,
) -> None:
    text = (await client.get("/prometheus")).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    names = dashboard_metric_names()
    assert {"depthflow_latency_seconds_bucket", "depthflow_data_loss_total"} <= names
    unknown = sorted(name for name in names if exported_family(name, families) is None)
    assert unknown == [], f"the Grafana dashboard queries metrics nobody exports: {unknown}"


def test_prometheus_scrapes_the_route_the_service_serves() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/prometheus"
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is missing"
    assert job["static_configs"][0]["targets"] == ["web:8000"]
