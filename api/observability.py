"""Request ids, structured JSON logs and Prometheus metrics.

Every request gets an id (the client's `X-Request-ID` when it is a sane token, else a new one), echoed in the
response header, attached to every log line written while the request runs, and to error bodies. Headers and
bodies are never logged, so API keys and questions stay out of the logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("rag.api")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
REQUEST_ID_SCOPE_KEY = "rag.request_id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any `extra={...}` fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            data["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in self._standard and key not in data:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str | int = "INFO") -> None:
    """JSON lines on stderr for the service and uvicorn's own loggers."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("rag", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # the middleware below logs every request, as JSON


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("rag_http_requests_total", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("rag_http_request_seconds", "HTTP request latency by route and status.",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("rag_tokens_total", "Decoder tokens: prompt (in) and generated (out).",
                              ["direction"], registry=self.registry)
        self.retrieval_seconds = Histogram("rag_retrieval_seconds", "Time spent retrieving chunks.",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation_seconds = Histogram("rag_generation_seconds", "Time spent in the decoder.",
                                            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generations_running = Gauge("rag_generations_running", "Generations holding a slot.",
                                         registry=self.registry)
        self.generations_waiting = Gauge("rag_generations_waiting", "Queue depth: generations waiting for a slot.",
                                         registry=self.registry)
        self.queue_wait = Histogram("rag_generation_queue_wait_seconds", "Time generations waited for a slot "
                                    "(whether they got one, passed the deadline or their client left).",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter("rag_generations_rejected_total", "Generations refused with 503: the queue was full "
                                "or the wait would pass RAG_QUEUE_TIMEOUT_S.", registry=self.registry)
        self.cancelled = Counter("rag_generations_cancelled_total", "Generations whose client left: while queued "
                                 "(nothing generated) or while generating (stopped there).", ["stage"],
                                 registry=self.registry)
        self.ingest_jobs = Counter("rag_ingest_jobs_total", "Ingestion jobs by final status.", ["status"],
                                   registry=self.registry)

    def observe_answer(self, usage: dict, timings: dict) -> None:
        self.tokens.labels("in").inc(usage.get("prompt_tokens", 0))
        self.tokens.labels("out").inc(usage.get("completion_tokens", 0))
        if "retrieve_ms" in timings:
            self.retrieval_seconds.observe(timings["retrieve_ms"] / 1000)
        if "generate_ms" in timings:
            self.generation_seconds.observe(timings["generate_ms"] / 1000)


def new_request_id(given: str | None) -> str:
    return given if given and _SAFE_ID.match(given) else uuid.uuid4().hex


def current_request_id(scope: Scope) -> str:
    return scope.get(REQUEST_ID_SCOPE_KEY) or request_id_var.get() or "-"


def route_label(scope: Scope) -> str:
    """The route template ('/v1/jobs/{job_id}'), never the raw path: metric labels must stay few."""
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return "unmatched"
    # Routes of included routers keep their own path; the router prefixes are the leading segments of the path.
    depth = template.rstrip("/").count("/")
    segments = scope["path"].rstrip("/").split("/")
    prefix = "/".join(segments[:len(segments) - depth])
    return prefix + template


class RequestContextMiddleware:
    """Pure ASGI (streaming responses pass straight through): request id, one JSON log line, metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = new_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering (ServerErrorMiddleware's reply)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route_path = route_label(scope)
            self.metrics.requests.labels(scope["method"], route_path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route_path, str(status)).observe(seconds)
            logger.info("request", extra={"method": scope["method"], "route": route_path,
                                          "path": scope.get("path"), "status": status,
                                          "duration_ms": round(seconds * 1000, 2)})
            request_id_var.reset(token)
