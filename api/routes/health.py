"""Liveness, readiness and metrics: no API key, so probes and scrapers need no secret."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.auth import require_api_key
from api.deps import ServiceDep
from api.errors import ApiError
from api.schemas import Health
from rag.errors import UnavailableError
from rag.types import Role

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Readiness: models loaded and an index open (else 503)",
            responses={503: {"model": Health, "description": "Still loading, loading failed, or no index yet."}})
async def readyz(service: ServiceDep, request: Request):
    """Ready or not, and why in plain words, for anyone (probes have no key); the details (snapshot, adapter, the
    error itself, which may name server paths) only for an admin key."""
    reason = service.not_ready_reason
    health = Health(status="not_ready" if reason else "ready", reason=reason)
    if await _is_admin(request):
        health.checks = {"models_loaded": service.models_loaded, "index_open": service.index_open,
                         "snapshot": service.snapshot,
                         "adapter": str(service.settings.adapter) if service.settings.adapter else None,
                         "default_path": service.settings.default_path.value}
        error = service.load_error or (None if service.index_open else service.index_error) or service.store_error
        if error:
            health.checks["error"] = error
    if reason is None:
        return health
    return JSONResponse(health.model_dump(), status_code=503,
                        headers={"Retry-After": str(service.api_settings.retry_after_s)})


async def _is_admin(request: Request) -> bool:
    try:
        await require_api_key(request)
    except ApiError:
        return False
    except UnavailableError:  # stored keys cannot be checked while their database is away: no details
        return False
    return request.state.principal.role.allows(Role.ADMIN)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
