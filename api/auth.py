"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>` on every /v1 route.

Keys come from `RAG_API_KEYS` (comma-separated) and/or `RAG_API_KEYS_FILE` (one per line, `#` comments);
`RAG_REVOKED_API_KEYS` lists keys refused with 403. With no key configured, auth is off (a warning is logged at
startup). Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured key, so the
time taken does not reveal how much of a key matched or which key it was; keys never appear in logs or errors.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.config import ApiSettings
from api.errors import ApiError

logger = logging.getLogger("rag.api")


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


# auto_error=False: a missing key is answered by `require_api_key` with our error body. These objects also put
# both schemes into the OpenAPI document, so /docs has an "Authorize" button.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`")


async def require_api_key(request: Request) -> None:
    """Dependency of every /v1 router: 401 without a (known) key, 403 for a revoked one."""
    keys: ApiKeys = request.app.state.api_keys
    if not keys.enabled:
        return
    credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
    presented = credentials.credentials if credentials else await _header(request)
    challenge = {"WWW-Authenticate": "Bearer"}
    if not presented:
        raise ApiError(401, "missing_api_key",
                       "An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
                       headers=challenge)
    verdict = keys.check(presented)
    if verdict == "revoked":
        raise ApiError(403, "revoked_api_key", "This API key has been revoked.")
    if verdict != "ok":
        raise ApiError(401, "invalid_api_key", "The API key is not valid.", headers=challenge)
