"""The PostgreSQL database of the store, the key store and the job queue: its connection pool (`Database`) and
its schema (ordered migrations, applied when a `Database` opens, under an advisory lock).

`MIGRATIONS[i]` is schema version i + 1. Steps are only ever appended (never edited once released); `migrate`
applies the missing ones in one transaction and records each in `schema_migrations`, so a crash leaves the
database at the old version or the new one. A database whose version is newer than this list was migrated by a
newer program, whose tables this one may misread: it is refused.

The embedding column is created untyped (`vector`) and typed (`vector(dim)`) by `initialise` at the first `begin`,
when the embedding model's dimension is known. pgvector builds HNSW only on a column with dimensions; an
expression index on `embedding::vector(dim)` would work too, but then every query must repeat that exact cast to
use it, and nothing would stop a vector of another dimension from being stored. Typing the column once (cheap:
the table is empty then) keeps the queries plain and lets Postgres check every vector's dimension.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from rag.config import Settings
from rag.errors import UnavailableError, UserError
from rag.store.base import IndexMismatchError

# Iterative index scans (`hnsw.iterative_scan`), which scoped dense search relies on, arrived in pgvector 0.8.0.
MIN_PGVECTOR = (0, 8, 0)

# Inner product on normalised vectors (= cosine), the embedded store's metric; pgvector's default build parameters
# (m 16, ef_construction 64). Created by `initialise`, and again by a bulk load that drops it (rag.store.postgres).
CREATE_VECTOR_INDEX = "CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_ip_ops)"

# pg_advisory_xact_lock keys (two int4): one namespace for this program, then what is locked.
LOCK_NAMESPACE = 0x5241_4701  # "RAG" + 1
MIGRATION_LOCK = 1
# Per-document write locks use (DOCUMENT_LOCK_NAMESPACE, hashtext(doc_id)): a hash collision only serialises two
# writers that need not be; it never lets two writers of one document through together.
DOCUMENT_LOCK_NAMESPACE = 0x5241_4702

MIGRATIONS: list[str] = [
    # 1: the index (meta, documents, chunks with their vectors and full-text terms) and the API keys.
    """
    CREATE EXTENSION IF NOT EXISTS vector;
    CREATE TABLE meta (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        embedding_model text NOT NULL,
        dimension integer NOT NULL,
        chunking jsonb NOT NULL,
        generation bigint NOT NULL DEFAULT 0,
        committed_at timestamptz,
        chunks bigint NOT NULL DEFAULT 0,  -- BM25's corpus statistics (rows, analysed terms in them), kept by
        terms bigint NOT NULL DEFAULT 0  -- every commit so a query need not count the whole table
    );
    CREATE TABLE documents (
        doc_id text PRIMARY KEY,
        collection text NOT NULL,
        source text NOT NULL,
        content_hash text NOT NULL,
        size bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        chunking text NOT NULL,
        chunk_count integer NOT NULL,
        ingested_at text NOT NULL,
        UNIQUE (collection, source)
    );
    CREATE TABLE chunks (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- a sequence: ids are never reused
        doc_id text NOT NULL REFERENCES documents (doc_id) ON DELETE CASCADE,
        collection text NOT NULL,  -- the document's, repeated so every search filters without a join
        ordinal integer NOT NULL,
        text text NOT NULL,
        source text NOT NULL,
        page integer,
        heading text,
        element_type text,
        tokens integer NOT NULL,
        hash text NOT NULL,
        context text NOT NULL DEFAULT '',
        embedding vector NOT NULL,  -- typed vector(dim) by initialise(); see the module docstring
        terms tsvector NOT NULL,  -- the analysed terms (rag.store.terms) as lexemes with their positions
        term_count integer NOT NULL,  -- BM25's document length
        UNIQUE (doc_id, ordinal)  -- also the index for lookups by doc_id
    );
    CREATE INDEX chunks_collection ON chunks (collection);
    CREATE INDEX chunks_terms ON chunks USING gin (terms);
    CREATE TABLE api_keys (
        id text PRIMARY KEY,
        name text NOT NULL,
        collection text NOT NULL,  -- '*' = every collection
        role text NOT NULL CHECK (role IN ('read', 'write', 'admin')),
        digest text NOT NULL UNIQUE,  -- hex SHA-256 of the secret (rag.store.keys.digest); the secret is never stored
        created_at text NOT NULL,  -- ISO 8601, as rag.store.keys and the embedded store's table keep them
        revoked_at text,
        position bigint GENERATED ALWAYS AS IDENTITY  -- creation order (created_at has whole seconds)
    );
    """,
    # 2: the ingestion job queue (rag.store.pg_jobs): jobs with their lease, attempts and per-file outcomes.
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        kind text NOT NULL,  -- 'upload' (API; run by `rag worker`s) or 'path' (`rag ingest`; run by itself)
        collection text NOT NULL,
        status text NOT NULL,  -- queued | running | succeeded | failed
        spec jsonb NOT NULL,
        owner text,  -- the worker holding the lease (or that ran the job)
        lease_until timestamptz,
        attempts integer NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL,
        started_at timestamptz,
        finished_at timestamptz,
        snapshot text,
        error text,
        index_counts jsonb NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_unfinished ON jobs (created_at) WHERE status IN ('queued', 'running');
    CREATE INDEX jobs_finished ON jobs (finished_at) WHERE status IN ('succeeded', 'failed');
    CREATE TABLE job_files (
        job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        position integer NOT NULL,
        filename text NOT NULL,
        source text NOT NULL,
        status text NOT NULL DEFAULT 'pending',
        chunks integer NOT NULL DEFAULT 0,
        error text,
        doc_id text,
        PRIMARY KEY (job_id, position)
    );
    """,
    # 3: what an ingested file's uploader should know (pages without a text layer, a guessed encoding).
    """
    ALTER TABLE job_files ADD COLUMN warnings jsonb NOT NULL DEFAULT '[]';
    """,
    # 4: the same warnings kept with the document they are about, for as long as it is in the index.
    """
    ALTER TABLE documents ADD COLUMN warnings jsonb NOT NULL DEFAULT '[]';
    """,
    # 5: the name a document is shown by (DocumentRecord.name), on its chunks too so that a read needs no join;
    # '' for documents from before: shown by their file name.
    """
    ALTER TABLE documents ADD COLUMN name text NOT NULL DEFAULT '';
    ALTER TABLE chunks ADD COLUMN name text NOT NULL DEFAULT '';
    """,
    # 6: each chunk's term frequencies by term (BM25's tf), so that scoring a matching row looks up the query's
    # words instead of unnesting its whole tsvector; filled from the tsvectors of the chunks there.
    """
    ALTER TABLE chunks ADD COLUMN term_frequencies jsonb NOT NULL DEFAULT '{}';
    UPDATE chunks SET term_frequencies = (SELECT COALESCE(jsonb_object_agg(lexeme, cardinality(positions)), '{}')
                                          FROM unnest(terms));
    """,
    # 7: the last page a chunk covers (Chunk.page_end); NULL for one page, and for chunks from before.
    """
    ALTER TABLE chunks ADD COLUMN page_end integer;
    """,
]


def schema_version(conn: psycopg.Connection) -> int:
    """The database's schema version; 0 for a database this program never touched."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(conn: psycopg.Connection) -> int:
    """Bring the database to the latest schema (a no-op when it is there); returns the version. `conn` must be in
    autocommit mode: the migration is its own transaction, serialised against other processes by an advisory lock."""
    known = len(MIGRATIONS)
    if _check(conn, schema_version(conn)) == known:  # the common case: no lock, no writes
        return known
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, MIGRATION_LOCK))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        current = _check(conn, schema_version(conn))  # another process may have migrated while we waited
        for version in range(current + 1, known + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
    return known


def require_pgvector(conn: psycopg.Connection) -> str:
    """The database's pgvector version (migration 1 created the extension); refused when older than MIN_PGVECTOR."""
    found, available = conn.execute(
        "SELECT extversion, (SELECT default_version FROM pg_available_extensions WHERE name = 'vector') "
        "FROM pg_extension WHERE extname = 'vector'").fetchone()
    if _version(found) < MIN_PGVECTOR:
        needed = ".".join(map(str, MIN_PGVECTOR))
        remedy = (f"The server has pgvector {available}: run `ALTER EXTENSION vector UPDATE` in the database"
                  if available and _version(available) >= MIN_PGVECTOR else
                  "Install pgvector 0.8 or newer on the server (e.g. the pgvector/pgvector Docker image)")
        raise UserError(f"The database uses pgvector {found}, but rag needs pgvector {needed} or newer (for "
                        f"filtered approximate search). {remedy}, then retry.")
    return found


def _version(text: str) -> tuple[int, ...]:
    """'0.8.5' -> (0, 8, 5); a suffix such as '0.9.0-dev' counts by its digits."""
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in text.split(".")[:3])


def _check(conn: psycopg.Connection, version: int) -> int:
    if version > len(MIGRATIONS):
        raise IndexMismatchError(
            f"The database has schema version {version}, but this program knows versions up to {len(MIGRATIONS)}: "
            "it was migrated by a newer version of rag. Upgrade this program (or use another database).")
    return version


def initialise(conn: psycopg.Connection, embedding_model: str, dimension: int, chunking: dict) -> dict | None:
    """Record the index's model and dimension and type the vector column, unless an index exists; returns the
    meta row found (None when this call created it). Serialised with migrations, so two first writers agree."""
    found = read_meta(conn)
    if found is not None:  # the common case: no lock
        return found
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, MIGRATION_LOCK))
        found = read_meta(conn)
        if found is not None:
            return found
        conn.execute(f"ALTER TABLE chunks ALTER COLUMN embedding TYPE vector({int(dimension)})")
        conn.execute(CREATE_VECTOR_INDEX)
        conn.execute("INSERT INTO meta (embedding_model, dimension, chunking) VALUES (%s, %s, %s)",
                     (embedding_model, dimension, json.dumps(chunking, sort_keys=True)))
    return None


def read_meta(conn: psycopg.Connection) -> dict | None:
    row = conn.execute("SELECT embedding_model, dimension, chunking, generation, committed_at, chunks, terms "
                       "FROM meta").fetchone()
    if row is None:
        return None
    model, dimension, chunking, generation, committed_at, chunks, terms = row
    return {"embedding_model": model, "dimension": dimension, "chunking": chunking, "generation": generation,
            "committed_at": committed_at.isoformat(timespec="seconds") if committed_at else "", "chunks": chunks,
            "terms": terms}


class Database:
    """A connection pool to one PostgreSQL database, migrated to this program's schema when opened.

    Connection failures become `UnavailableError` naming host:port/database, never the password. `from_settings`
    shares one pool per process among the stores, the key store and the job queue (`db_pool_size` connections per
    process), counting its users: the last `close` closes it.
    """

    _shared: dict[tuple, "Database"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, url: str, pool_size: int, timeout_s: float):
        self.url = url
        self._key = (url, pool_size, timeout_s)
        self._users = 1
        try:
            info = conninfo_to_dict(url)
        except psycopg.ProgrammingError as error:
            raise UserError(f"Invalid database URL: {_first_line(error)}") from None
        self._password = info.get("password") or ""
        self.label = f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"
        connect_timeout = max(2, math.ceil(timeout_s))  # libpq's minimum; whole seconds
        try:  # one direct connection first: a clear error at once (a pool would retry until its timeout)
            with psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
                migrate(conn)
                require_pgvector(conn)
        except psycopg.OperationalError as error:
            raise self.unavailable(error) from None
        # Every connection sends and reads vectors as numpy arrays in pgvector's binary format.
        self.pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout_s, open=True,
                                   kwargs={"autocommit": True, "connect_timeout": connect_timeout},
                                   configure=register_vector, check=ConnectionPool.check_connection,
                                   name=f"rag-{self.label}")

    @classmethod
    def from_settings(cls, url: str, settings: Settings | None = None) -> "Database":
        """Pool size and timeouts from `settings` (`db_pool_size`, `db_timeout_s`), or their defaults."""
        defaults = Settings.model_fields
        pool_size = settings.db_pool_size if settings else defaults["db_pool_size"].default
        timeout_s = settings.db_timeout_s if settings else defaults["db_timeout_s"].default
        with cls._shared_lock:
            database = cls._shared.get((url, pool_size, timeout_s))
            if database is not None:
                database._users += 1
                return database
            database = cls._shared[url, pool_size, timeout_s] = cls(url, pool_size, timeout_s)
            return database

    def unavailable(self, error: Exception) -> UnavailableError:
        reason = _first_line(error) if not isinstance(error, PoolTimeout) else "no connection became free in time"
        if self._password:
            reason = reason.replace(self._password, "***")
        return UnavailableError(f"The database at {self.label} is unavailable ({reason}). Check that PostgreSQL "
                                "is running and reachable, then retry.")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode (use `conn.transaction()` for more than one statement)."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as error:
            raise self.unavailable(error) from None

    def close(self) -> None:
        with self._shared_lock:
            self._users -= 1
            if self._users > 0:
                return
            if self._shared.get(self._key) is self:
                del self._shared[self._key]
        self.pool.close()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
