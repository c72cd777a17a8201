"""Liveness, readiness and metrics: no API key, so probes and scrapers need no secret."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServiceDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Readiness: models loaded and an index open (else 503)",
            responses={503: {"model": Health, "description": "Still loading, loading failed, or no index yet."}})
async def readyz(service: ServiceDep):
    retriever = service._retriever
    checks = {"models_loaded": service.models_loaded, "index_open": retriever is not None,
              "snapshot": service.snapshot,
              "adapter": str(service.settings.adapter) if service.settings.adapter else None,
              "default_path": service.settings.default_path.value}
    if service.load_error:
        checks["error"] = service.load_error
    elif retriever is None and service.index_error:
        checks["error"] = service.index_error
    elif service.store_error:
        checks["error"] = service.store_error
    if service.ready:
        return Health(status="ready", checks=checks)
    return JSONResponse(Health(status="not_ready", checks=checks).model_dump(), status_code=503,
                        headers={"Retry-After": str(service.api_settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
