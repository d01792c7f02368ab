"""Monitoring routes: /health, /ready, /live, /metrics, /prometheus.

/health, /ready and /live answer from the service's shared check result (refreshed by one task
about twice a second), so any number of concurrent probes neither waits on a dependency nor
reports one as down because the probes themselves piled up on it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from depthflow.accounting import CheckState
from depthflow.api.deps import ServiceDep
from depthflow.metrics import metrics_document

router = APIRouter(tags=["monitoring"])


class Health(BaseModel):
    status: Literal["OK", "DEGRADED"]
    timestamp: datetime
    checks: dict[str, Any]


class Live(BaseModel):
    status: Literal["OK", "FAILING"]
    timestamp: datetime
    checks: dict[str, Any]


def _health(service: ServiceDep) -> tuple[Health, bool]:
    checks = service.checks()
    ok = (
        checks["database"] == CheckState.OK
        and checks["redis"] in {CheckState.OK, CheckState.DISABLED}
        and checks["feed"] in {CheckState.OK, CheckState.DISABLED}
        and all(state == CheckState.OK for state in checks["tasks"].values())
    )
    body = Health(status="OK" if ok else "DEGRADED", timestamp=datetime.now(UTC), checks=checks)
    return body, ok


@router.get("/health", response_model=Health, summary="Liveness with dependency checks")
async def health(service: ServiceDep) -> Health:
    """200 while the process lives; `status` says whether everything is OK."""
    body, _ = _health(service)
    return body


@router.get(
    "/ready",
    response_model=Health,
    responses={503: {"model": Health, "description": "Not ready"}},
    summary="Readiness: database, Redis and every book in sync",
)
async def ready(service: ServiceDep) -> Response:
    body, ok = _health(service)
    ready = ok and service.pipeline.in_sync
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get(
    "/live",
    response_model=Live,
    responses={503: {"model": Live, "description": "A task is down or the feed stalled"}},
    summary="Liveness for orchestrators: every supervised task runs, a connected feed receives",
)
async def live(service: ServiceDep) -> Response:
    """200 while the process does its work; 503 when a supervised task is down or restarting,
    or a connected feed has received nothing for `FEED_STALL_S` (restart the container)."""
    ok, checks = service.live()
    body = Live(status="OK" if ok else "FAILING", timestamp=datetime.now(UTC), checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get("/metrics", summary="Counters summed over every process sharing the Redis")
async def metrics(service: ServiceDep) -> dict[str, Any]:
    totals = await service.redis_sink.totals()
    document = metrics_document(
        totals,
        service.process_stats,
        service.metrics.latency_percentiles(),
        service.loop_lag.recent_max(),
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
