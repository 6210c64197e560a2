"""Liveness, readiness and Prometheus metrics (never behind an API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.common import ORJSONResponse, engine_of

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> ORJSONResponse:
    """The process is up and its event loop answers."""
    return ORJSONResponse({"status": "alive"})


@router.get("/readyz", responses={503: {"description": "Models are not loaded yet"}})
async def readyz(request: Request) -> ORJSONResponse:
    """200 once the model repository has been loaded."""
    engine = engine_of(request)
    if not engine.ready:
        return ORJSONResponse({"status": "loading"}, status_code=503)
    versions = engine.repository.versions()
    return ORJSONResponse(
        {
            "status": "ready",
            "models_ready": sum(v.ready for v in versions),
            "models_failed": sum(not v.ready for v in versions),
        }
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    engine = engine_of(request)
    engine.metrics.models_ready.set(sum(v.ready for v in engine.repository.versions()))
    await engine.metrics.refresh()
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
