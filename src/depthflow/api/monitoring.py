"""Monitoring routes: /health, /ready, /metrics, /prometheus."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from depthflow.api.deps import ServiceDep
from depthflow.metrics import metrics_document

router = APIRouter(tags=["monitoring"])


class Health(BaseModel):
    status: Literal["OK", "DEGRADED"]
    timestamp: datetime
    checks: dict[str, Any]


async def _health(service: ServiceDep) -> tuple[Health, bool]:
    checks = await service.checks()
    ok = (
        checks["database"] == "ok"
        and checks["redis"] in {"ok", "disabled"}
        and checks["feed"] in {"ok", "disabled"}
        and all(state == "ok" for state in checks["tasks"].values())
    )
    body = Health(status="OK" if ok else "DEGRADED", timestamp=datetime.now(UTC), checks=checks)
    return body, ok


@router.get("/health", response_model=Health, summary="Liveness with dependency checks")
async def health(service: ServiceDep) -> Health:
    """200 while the process lives; `status` says whether everything is OK."""
    body, _ = await _health(service)
    return body


@router.get(
    "/ready",
    response_model=Health,
    responses={503: {"model": Health, "description": "Not ready"}},
    summary="Readiness: database, Redis and every book in sync",
)
async def ready(service: ServiceDep) -> Response:
    body, ok = await _health(service)
    ready = ok and service.pipeline.in_sync
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", summary="Counters summed over every process sharing the Redis")
async def metrics(service: ServiceDep) -> dict[str, Any]:
    totals = await service.redis_sink.totals()
    document = metrics_document(
        totals, service.process_stats, service.metrics.latency_percentiles()
    )
    return dict(document)


@router.get(
    "/prometheus",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus text exposition of this process",
)
async def prometheus(service: ServiceDep) -> Response:
    return Response(service.metrics.render_prometheus(), media_type=CONTENT_TYPE_LATEST)
