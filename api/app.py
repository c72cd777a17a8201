"""The HTTP service: `create_app()` builds the FastAPI application around one `Pipeline`.

    uvicorn --factory api.app:create_app        # or: rag serve

Startup loads the embedder, the index and the decoder once, in a background thread: /healthz answers at once,
/readyz says 503 until everything is loaded and an index is open. Every /v1 route requires an API key when keys are
configured (see api/auth.py). Layout: routers per resource in api/routes/, wire schemas in api/schemas.py, shared
state in api/service.py, ingestion jobs in api/jobs.py, logging and metrics in api/observability.py.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from rag import offline  # noqa: F401  (before any model library is imported)
from api import web
from api.auth import ApiKeys, Authenticator, require_api_key
from api.config import ApiSettings
from api.errors import install_error_handlers, json_error
from api.jobs import IngestQueue
from api.observability import Metrics, RequestContextMiddleware, configure_logging
from api.routes import ask, documents, evals, health, keys, openai_compat, search, sources
from api.service import Service
from rag.config import Settings
from rag.errors import RagError
from rag.pipeline import Pipeline
from rag.store import open_key_store

logger = logging.getLogger("rag.api")
JSON_BODY_LIMIT = 1024 * 1024  # questions are at most 2000 characters; nothing but uploads needs more


class BodyLimitMiddleware:
    """413 for bodies over the limit, before they are read: uploads get RAG_MAX_UPLOAD_MB, the rest 1 MB."""

    def __init__(self, app: ASGIApp, upload_limit: int):
        self.uploads = RequestBodyLimitMiddleware(app, upload_limit)
        self.others = RequestBodyLimitMiddleware(app, JSON_BODY_LIMIT)

        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.uploads(scope, receive, send)
            return
        is_upload = scope["path"].rstrip("/") == "/v1/documents"
        limit = self.upload_limit if is_upload else JSON_BODY_LIMIT
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # Answered here, in our error shape: past this point Starlette would replace any reply with plain text.
            message = (f"The upload is larger than the limit of {limit / 1024 / 1024:g} MB (RAG_MAX_UPLOAD_MB)."
                       if is_upload else f"The request body is larger than {limit // 1024} KB.")
            await json_error(scope, 413, "payload_too_large", message)(scope, receive, send)
            return
        # A body without a declared length is counted as it arrives.
        await (self.uploads if is_upload else self.others)(scope, receive, send)


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None, *,
               api_settings: ApiSettings | None = None, ingest_embedder=None) -> FastAPI:
    """The application. Without arguments everything comes from RAG_* environment variables.

    `pipeline` lets a caller (tests, an embedding application) share already-loaded models; `ingest_embedder`
    is the embedder for upload jobs (by default a second instance, loaded on the first upload).
    """
    settings = settings or (pipeline.settings if pipeline else Settings())
    pipeline = pipeline or Pipeline(settings)
    api_settings = api_settings or ApiSettings()
    authenticator = Authenticator(ApiKeys.from_settings(api_settings), lambda: open_key_store(settings),
                                  api_settings.key_cache_s)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not logging.getLogger().handlers and not logging.getLogger("rag").handlers:
            configure_logging()  # nobody configured logging (bare `uvicorn --factory`): JSON lines on stderr
        # Built here, inside the server's event loop, which the limiter's semaphore belongs to.
        service = Service(settings, api_settings, pipeline, metrics)
        app.state.service = service
        app.state.ingest = IngestQueue(service, metrics, ingest_embedder)
        try:
            if not authenticator.enabled():
                logger.warning("no API keys configured (RAG_API_KEYS / RAG_API_KEYS_FILE / `rag keys create`): "
                               "/v1 is open to anyone")
        except RagError as error:  # the key store's database is away: /v1 answers 503 until it is back
            logger.warning("cannot read the API key store", extra={"error": str(error)})
        threading.Thread(target=service.load, name="model-loader", daemon=True).start()
        threading.Thread(target=service.watch_index, name="index-watcher", daemon=True).start()
        try:
            yield
        finally:
            service.stop()
            app.state.ingest.shutdown()
            authenticator.close()

    app = FastAPI(
        title="rag-service",
        version="0.1.0",
        summary="Question answering with citations over your documents.",
        description="Every /v1 route needs an API key (`Authorization: Bearer <key>` or `X-API-Key`) when keys are "
                    "configured, and works in one collection (`collection` in a JSON body or form, `?collection=` "
                    "otherwise; default: the key's own). Errors have one shape: `{\"error\": {\"type\", \"code\", "
                    "\"message\", \"request_id\"}}`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_settings = api_settings
    app.state.authenticator = authenticator
    app.state.metrics = metrics

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                   responses={401: {"description": "Missing or unknown API key."},
                              403: {"description": "Revoked API key, or a collection or role it does not have."},
                              413: {"description": "Request body over the limit."},
                              422: {"description": "Invalid request; the message says what and why."},
                              503: {"description": "Busy (see Retry-After), still loading, or no index yet."}})
    for module in (ask, search, documents, sources, evals, openai_compat, keys):
        v1.include_router(module.router)
    app.include_router(health.router)
    app.include_router(web.router)  # the web app at /: static files only, data through /v1
    app.include_router(v1)

    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, upload_limit=api_settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost of ours: sees every response
    return app
