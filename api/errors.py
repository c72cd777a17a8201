"""One error body for every failure, OpenAI-style so the OpenAI clients parse it too:

    {"error": {"type": "invalid_request_error", "code": "validation_error", "message": "...",
               "request_id": "...", "details": [...]}}

Nothing returns a stack trace: an unexpected exception is logged with its traceback and the client gets a generic
500 with the request id to quote.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.limiter import Busy
from api.observability import current_request_id
from rag.errors import RagError, UserError

logger = logging.getLogger("rag.api")

# The one code of a 422 for invalid input, whether the schema, a route or the library (UserError) refused it.
VALIDATION_ERROR = UserError.code

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 500: "server_error"}


class ApiError(Exception):
    """An error with its HTTP status, a stable machine-readable code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 details: list | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.details = status, code, message, headers, details


def error_response(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   details: list | None = None) -> JSONResponse:
    return json_error(request.scope, status, code, message, headers, details)


def json_error(scope, status: int, code: str, message: str, headers: dict[str, str] | None = None,
               details: list | None = None) -> JSONResponse:
    request_id = current_request_id(scope)
    body = {"type": _TYPES.get(status, "invalid_request_error"), "code": code, "message": message,
            "request_id": request_id}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status,
                        headers={**(headers or {}), "X-Request-ID": request_id})


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error.status, error.code, error.message, error.headers, error.details)

    @app.exception_handler(RagError)
    async def _library_error(request: Request, error: RagError) -> JSONResponse:
        """The library's errors, mapped once: the status and code come with the error class (rag/errors.py)."""
        headers = None
        if error.http_status in (409, 503):  # the state may change: a locked index, a decoder server coming back
            headers = {"Retry-After": str(request.app.state.api_settings.retry_after_s)}
        return error_response(request, error.http_status, error.code, str(error), headers)

    @app.exception_handler(Busy)
    async def _busy(request: Request, error: Busy) -> JSONResponse:
        request.app.state.metrics.rejected.inc()
        return error_response(request, 503, "overloaded", str(error), {"Retry-After": str(error.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # Reasons and where, never the input itself (it may be large or secret).
        details = [{"loc": _location(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
                   for item in error.errors()]
        message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details) or "Invalid request."
        return error_response(request, 422, VALIDATION_ERROR, message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}
        message = error.detail if isinstance(error.detail, str) else "Request failed."
        if error.status_code == 400:  # FastAPI could not decode the body: invalid input like any other, so 422
            return error_response(request, 422, VALIDATION_ERROR,
                                  f"{message}: send UTF-8 JSON (or multipart for uploads) matching the schema.")
        if error.status_code == 413:  # a body without Content-Length that grew past the limit
            message = "The request body is larger than the limit (uploads: RAG_MAX_UPLOAD_MB)."
        return error_response(request, error.status_code, codes.get(error.status_code, "http_error"), message,
                              dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error", extra={"path": request.url.path})
        return error_response(request, 500, "internal_error",
                              "Internal error. Quote the request id when reporting it.")
