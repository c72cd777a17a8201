"""API keys in PostgreSQL (`RAG_STORE_URL`): the `api_keys` table of `rag.store.pg_schema`, with the records,
digests and validation of `rag.store.keys`, so that both key stores issue and read keys alike."""

from __future__ import annotations

from rag.config import Settings
from rag.store.keys import KEY_COLUMNS, ApiKeyRecord, KeyNotFoundError, digest, new_key, record_from_row
from rag.store.pg_schema import Database
from rag.store.shared import utc_now
from rag.types import Role


class PostgresKeyStore:
    """API keys in the database's `api_keys` table: the `rag.store.keys.KeyStore` protocol, SQL in, `ApiKeyRecord`
    out."""

    def __init__(self, database: Database):
        self._db = database
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "PostgresKeyStore":
        return cls(Database.from_settings(settings.store_url, settings))

    def create(self, name: str, collection: str, role: Role | str) -> tuple[ApiKeyRecord, str]:
        record, secret = new_key(name, collection, role)
        with self._db.connection() as conn:
            conn.execute(f"INSERT INTO api_keys ({KEY_COLUMNS}, digest) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         (record.id, record.name, record.collection, record.role.value, record.created_at, None,
                          digest(secret)))
        return record, secret

    def list(self, collection: str | None = None) -> list[ApiKeyRecord]:
        with self._db.connection() as conn:
            rows = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE %(scope)s::text IS NULL "
                                "OR collection = %(scope)s ORDER BY position", {"scope": collection}).fetchall()
        return [record_from_row(row) for row in rows]

    def revoke(self, key_id: str, collection: str | None = None) -> ApiKeyRecord:
        """Revoke a key (once: a revoked key keeps its first revocation time); outside `collection` it is not
        found, like an unknown key."""
        scope = {"id": key_id, "scope": collection, "now": utc_now()}
        with self._db.connection() as conn, conn.transaction():
            conn.execute("UPDATE api_keys SET revoked_at = %(now)s WHERE id = %(id)s AND revoked_at IS NULL "
                         "AND (%(scope)s::text IS NULL OR collection = %(scope)s)", scope)
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = %(id)s "
                               "AND (%(scope)s::text IS NULL OR collection = %(scope)s)", scope).fetchone()
        if row is None:
            raise KeyNotFoundError(f"No API key '{key_id[:64]}'.")
        return record_from_row(row)

    def lookup(self, key_digest: str) -> ApiKeyRecord | None:
        with self._db.connection() as conn:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = %s", (key_digest,)).fetchone()
        return record_from_row(row) if row else None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()
