"""API keys scoped to a collection with a role, stored as SHA-256 digests (the secret is shown once, at creation).

    >>> keys = EmbeddedKeyStore(Path("rag-index"))  # doctest: +SKIP
    >>> record, secret = keys.create("ci bot", "handbook", Role.READ)  # doctest: +SKIP
    >>> keys.lookup(digest(secret)) == record  # doctest: +SKIP
    True

A key may use one collection (or every collection: `ALL_COLLECTIONS`) with a role: `read` searches and asks,
`write` also uploads and deletes documents, `admin` also manages keys. The embedded key store keeps the table
`api_keys` in the index's own SQLite database; the PostgreSQL key store (`rag.store.pg_keys`) has the same table and
columns (`KEY_COLUMNS`) and builds its records with `new_key` and `record_from_row`, so both issue and read keys
alike.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rag.errors import NotFoundError, UserError
from rag.store.shared import utc_now
from rag.store.sqlite_schema import connect
from rag.types import ALL_COLLECTIONS, Role, check_collection

SECRET_PREFIX = "rag_"
SECRET_BYTES = 32  # 256 bits of randomness: a digest lookup needs no salt or slow hash against guessing
KEY_COLUMNS = "id, name, collection, role, created_at, revoked_at"
MAX_NAME = 100
SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    collection TEXT NOT NULL,        -- a collection name, or '*' for every collection
    role TEXT NOT NULL,              -- read | write | admin
    digest TEXT NOT NULL UNIQUE,     -- hex SHA-256 of the secret; the secret itself is never stored
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
"""


class KeyNotFoundError(NotFoundError):
    code = "key_not_found"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored key, without its secret. `collection` is a name or `ALL_COLLECTIONS`."""

    id: str
    name: str
    collection: str
    role: Role
    created_at: str
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict:
        """The same fields for `rag keys list --json` and GET /v1/keys."""
        return {"id": self.id, "name": self.name, "collection": self.collection, "role": self.role.value,
                "created_at": self.created_at, "revoked_at": self.revoked_at}


def digest(secret: str) -> str:
    """What is stored and looked up instead of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_scope(collection: str) -> str:
    return collection if collection == ALL_COLLECTIONS else check_collection(collection)


def new_key(name: str, collection: str, role: Role | str) -> tuple[ApiKeyRecord, str]:
    """A new record and its secret, validated; the caller stores the record with `digest(secret)`."""
    name = name.strip()
    if len(name) > MAX_NAME:
        raise UserError(f"A key's name has at most {MAX_NAME} characters.")
    record = ApiKeyRecord(f"key_{secrets.token_hex(8)}", name, check_scope(collection), Role.parse(role), utc_now())
    return record, SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def record_from_row(row: tuple) -> ApiKeyRecord:
    """A record from a row of `SELECT {KEY_COLUMNS} FROM api_keys` (timestamps as ISO text)."""
    id_, name, collection, role, created_at, revoked_at = row
    return ApiKeyRecord(id_, name, collection, Role(role), str(created_at),
                        str(revoked_at) if revoked_at is not None else None)


class KeyStore(Protocol):
    def create(self, name: str, collection: str, role: Role | str) -> tuple[ApiKeyRecord, str]: ...
    # `collection`: only the keys of that scope (a name or ALL_COLLECTIONS); None: every key (an all-collections
    # admin). A key outside the scope is not found, exactly like an unknown one.
    def list(self, collection: str | None = None) -> list[ApiKeyRecord]: ...  # oldest first, revoked included
    def revoke(self, key_id: str, collection: str | None = None) -> ApiKeyRecord: ...  # else KeyNotFoundError
    def lookup(self, key_digest: str) -> ApiKeyRecord | None: ...
    def close(self) -> None: ...


class EmbeddedKeyStore:
    """Keys in `<index_dir>/store.sqlite`, beside the index and its job log. Safe to use from several threads."""

    def __init__(self, index_dir: Path):
        index_dir.mkdir(parents=True, exist_ok=True)
        self.db = connect(index_dir)
        self.db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def create(self, name: str, collection: str, role: Role | str) -> tuple[ApiKeyRecord, str]:
        record, secret = new_key(name, collection, role)
        with self._lock:
            self.db.execute(f"INSERT INTO api_keys ({KEY_COLUMNS}, digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (record.id, record.name, record.collection, record.role.value, record.created_at,
                             None, digest(secret)))
        return record, secret

    def list(self, collection: str | None = None) -> list[ApiKeyRecord]:
        with self._lock:
            rows = self.db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE ? IS NULL OR collection = ? "
                                   "ORDER BY created_at, rowid", (collection, collection)).fetchall()
        return [record_from_row(row) for row in rows]

    def revoke(self, key_id: str, collection: str | None = None) -> ApiKeyRecord:
        """Revoke a key (once: a revoked key keeps its first revocation time)."""
        scope = (key_id, collection, collection)
        with self._lock:
            self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND (? IS NULL OR collection = ?) "
                            "AND revoked_at IS NULL", (utc_now(), *scope))
            row = self.db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ? AND "
                                  "(? IS NULL OR collection = ?)", scope).fetchone()
        if row is None:
            raise KeyNotFoundError(f"No API key '{key_id[:64]}'.")
        return record_from_row(row)

    def lookup(self, key_digest: str) -> ApiKeyRecord | None:
        with self._lock:
            row = self.db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = ?", (key_digest,)).fetchone()
        return record_from_row(row) if row else None

    def close(self) -> None:
        self.db.close()
