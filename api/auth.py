"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>` on every /v1 route, resolved to a `Principal`.

Two kinds of key. Keys from `RAG_API_KEYS` (comma-separated) and/or `RAG_API_KEYS_FILE` (one per line, `#`
comments) are admin keys on every collection; `RAG_REVOKED_API_KEYS` lists keys refused with 403. They are compared
as SHA-256 digests with `hmac.compare_digest` against every configured key, so the time taken does not reveal how
much of a key matched or which key it was. Keys made by `rag keys create` / POST /v1/keys (rag/store/keys.py) are
scoped to one collection (or all) with a role; they are found by the SHA-256 digest of the presented key in the key
store (the lookup compares digests, whose timing says nothing usable about a 256-bit random secret) and cached for
RAG_KEY_CACHE_S seconds, so a revocation made by another process takes effect within that time.

Auth is on when any key of either kind exists; with none, /v1 is open as an admin on every collection (a warning
is logged at startup). Keys never appear in logs or errors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.config import ApiSettings
from api.errors import ApiError
from rag.store.keys import ApiKeyRecord, KeyStore, digest
from rag.types import ALL_COLLECTIONS, MAX_COLLECTION_NAME, Role, check_collection

logger = logging.getLogger("rag.api")
MAX_CACHED_KEYS = 10_000  # presented keys remembered; unknown keys sprayed at the server must not grow it unbounded
COLLECTION_HELP = ("The collection to work in; default: the key's own collection when it has one, else the "
                   "server's (RAG_COLLECTION).")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _read_keys_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"Cannot read the API keys file '{path}': {error.strerror}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


@dataclass(frozen=True)
class ApiKeys:
    """The keys configured in the environment: admin keys on every collection."""

    valid: tuple[bytes, ...]  # SHA-256 digests, never the keys themselves
    revoked: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> "ApiKeys":
        keys = _split(settings.api_keys)
        if settings.api_keys_file:
            keys += _read_keys_file(settings.api_keys_file)
        revoked = {_digest(key) for key in _split(settings.revoked_api_keys)}
        return cls(tuple(d for d in dict.fromkeys(map(_digest, keys)) if d not in revoked), tuple(revoked))

    @property
    def enabled(self) -> bool:
        return bool(self.valid or self.revoked)

    def check(self, presented: str) -> str:
        """'ok', 'revoked' or 'unknown'; compares with every key, whatever matched first."""
        digest = _digest(presented)
        valid = False
        revoked = False
        for known in self.valid:
            valid |= hmac.compare_digest(digest, known)
        for known in self.revoked:
            revoked |= hmac.compare_digest(digest, known)
        return "revoked" if revoked else "ok" if valid else "unknown"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the collection its key may use (or every one) and its role."""

    collection: str  # a collection name, or ALL_COLLECTIONS
    role: Role
    key_id: str | None = None  # a stored key's id; None for RAG_API_KEYS keys and when auth is off

    def may_use(self, collection: str) -> bool:
        return self.collection in (ALL_COLLECTIONS, collection)


ENVIRONMENT_ADMIN = Principal(ALL_COLLECTIONS, Role.ADMIN)


class Authenticator:
    """Resolves a presented key to a `Principal`: environment keys first, then the key store (opened on first use).

    Store lookups and the "any stored key?" answer are cached for `cache_s` seconds; `forget()` drops the cache
    (after this process created or revoked a key, so its own changes apply at once).
    """

    def __init__(self, environment: ApiKeys, open_store: Callable[[], KeyStore], cache_s: float):
        self.environment = environment
        self.cache_s = cache_s
        self._open_store = open_store
        self._store: KeyStore | None = None
        self._lock = threading.Lock()
        self._records: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._any_stored: tuple[float, bool] = (0.0, False)

    @property
    def key_store(self) -> KeyStore:
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def enabled(self) -> bool:
        """Whether a key is required: any environment key or any stored key (revoked ones too) exists."""
        if self.environment.enabled:
            return True
        expires, stored = self._any_stored
        if time.monotonic() >= expires:
            stored = bool(self.key_store.list())
            self._any_stored = (time.monotonic() + self.cache_s, stored)
        return stored

    def _stored(self, key_digest: str) -> ApiKeyRecord | None:
        expires, record = self._records.get(key_digest, (0.0, None))
        if time.monotonic() >= expires:
            record = self.key_store.lookup(key_digest)
            if len(self._records) >= MAX_CACHED_KEYS:
                self._records.clear()
            self._records[key_digest] = (time.monotonic() + self.cache_s, record)
        return record

    def resolve(self, presented: str) -> Principal:
        """The principal of a key; 401 for an unknown key, 403 for a revoked one."""
        verdict = self.environment.check(presented)
        if verdict == "ok":
            return ENVIRONMENT_ADMIN
        record = None if verdict == "revoked" else self._stored(digest(presented))
        if verdict == "revoked" or (record is not None and record.revoked):
            raise ApiError(403, "revoked_api_key", "This API key has been revoked.")
        if record is None:
            raise ApiError(401, "invalid_api_key", "The API key is not valid.", headers=_CHALLENGE)
        return Principal(record.collection, record.role, record.id)

    def forget(self) -> None:
        self._records.clear()
        self._any_stored = (0.0, False)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


# auto_error=False: a missing key is answered by `require_api_key` with our error body. These objects also put
# both schemes into the OpenAPI document, so /docs has an "Authorize" button.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def require_api_key(request: Request) -> None:
    """Dependency of every /v1 router: 401 without a (known) key, 403 for a revoked one; sets
    `request.state.principal` (an admin on every collection when auth is off)."""
    authenticator: Authenticator = request.app.state.authenticator
    if not await run_in_threadpool(authenticator.enabled):
        request.state.principal = ENVIRONMENT_ADMIN
        return
    credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
    presented = credentials.credentials if credentials else await _header(request)
    if not presented:
        raise ApiError(401, "missing_api_key",
                       "An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
                       headers=_CHALLENGE)
    request.state.principal = await run_in_threadpool(authenticator.resolve, presented)


def authorize(request: Request, asked: str | None, needs: Role) -> str:
    """The collection a request works in (`asked`, else the key's own, else the server's), after checking that
    its key may use that collection with role `needs`; 403 otherwise. Errors name only what the request asked."""
    principal: Principal = request.state.principal
    if asked is not None:
        collection = check_collection(asked)
    elif principal.collection != ALL_COLLECTIONS:
        collection = principal.collection
    else:
        collection = request.app.state.settings.collection
    if not principal.may_use(collection):
        raise ApiError(403, "collection_forbidden", f"This API key may not use the collection '{collection}'.")
    if not principal.role.allows(needs):
        raise ApiError(403, "role_forbidden",
                       f"This API key has the role '{principal.role.value}'; this needs '{needs.value}'.")
    return collection


def scope(needs: Role):
    """A dependency: the checked collection of a request that names it in the query (`?collection=`)."""

    def collection_of(request: Request,
                      collection: Annotated[str | None, Query(max_length=MAX_COLLECTION_NAME,
                                                              description=COLLECTION_HELP)] = None
                      ) -> str:
        return authorize(request, collection, needs)

    return collection_of


ReadScope = Annotated[str, Depends(scope(Role.READ))]
WriteScope = Annotated[str, Depends(scope(Role.WRITE))]
