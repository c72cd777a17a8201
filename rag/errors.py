"""One error hierarchy for the library. The CLI maps it to exit codes and the API to HTTP statuses, once each.

Every message says what was wrong and what to do; none carries a traceback or another collection's data.

    RagError
    ├── UserError         bad input or settings            CLI exit 2, HTTP 422
    ├── NotFoundError     no such document, job, model...  CLI exit 3, HTTP 404
    ├── ConflictError     state forbids it (index locked)  CLI exit 3, HTTP 409
    └── UnavailableError  a dependency cannot serve now    CLI exit 3, HTTP 503
"""

from __future__ import annotations


class RagError(Exception):
    """Base of every error the library raises on purpose; `code` is a stable machine-readable name."""

    code = "error"
    exit_code = 3
    http_status = 500


class UserError(RagError, ValueError):
    """The request or the settings are invalid (a ValueError, so validators and callers may catch it as one)."""

    code = "validation_error"  # also the API's code for a request its schemas refuse (api/errors.py)
    exit_code = 2
    http_status = 422


class NotFoundError(RagError, LookupError):
    """A named thing does not exist: a document, a job, an index, a model, an adapter."""

    code = "not_found"
    http_status = 404


class ConflictError(RagError):
    """The current state forbids the operation (another writer holds the index, an index of another model)."""

    code = "conflict"
    http_status = 409


class UnavailableError(RagError):
    """A dependency cannot serve right now (decoder server, database); retrying later may work."""

    code = "unavailable"
    http_status = 503
