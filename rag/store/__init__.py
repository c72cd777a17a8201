"""Index stores behind one interface (`rag.store.base.Store`): the embedded one (SQLite + FAISS segments in a
directory, the default) and PostgreSQL + pgvector (`RAG_STORE_URL`). Code outside this package opens stores, job
logs and key stores through the factories below, so that the setting alone picks the backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rag.store.base import (DEFAULT_COLLECTION, CommitInfo, CompactionInfo, DocumentRecord, IndexBusyError,
                            IndexMismatchError, IndexNotFoundError, Manifest, StoreError, check_collection)
from rag.store.embedded import EmbeddedStore
from rag.store.segments import compact

if TYPE_CHECKING:
    from rag.config import Settings
    from rag.store.base import Store as StoreProtocol

Store = EmbeddedStore


def _postgres():
    from rag.store import postgres  # imported only when configured: psycopg is not needed otherwise

    return postgres


def open_store(settings: Settings, embedding_model: str | None = None,
               dimension: int | None = None) -> StoreProtocol:
    """A reader of the configured index; with a model name/dimension, refuse an index built with others."""
    if settings.store_url:
        return _postgres().PostgresStore.open(settings.store_url, embedding_model, dimension, settings=settings)
    return EmbeddedStore.open(settings.index_dir, embedding_model, dimension)


def recorded_chunking(settings: Settings) -> dict:
    """How the configured index's documents were last chunked and embedded (its manifest's `chunking`), {} when
    there is no index yet: a writer reads it before `begin_store` to embed like the index (`Embedder.follow`)."""
    try:
        store = open_store(settings)
    except (IndexNotFoundError, IndexMismatchError):  # none yet, or one in the old snapshot format (no record)
        return {}
    try:
        return store.chunking
    finally:
        store.close()


def begin_store(settings: Settings, embedding_model: str, dimension: int, chunking: dict) -> StoreProtocol:
    """A writer of the configured index (created if needed); changes are buffered until its `commit`."""
    if settings.store_url:
        return _postgres().PostgresStore.begin(settings.store_url, embedding_model, dimension, chunking,
                                               settings=settings)
    return EmbeddedStore.begin(settings.index_dir, embedding_model, dimension, chunking)


def open_job_log(settings: Settings):
    """The durable log of ingestion jobs: in the index's SQLite, or the job queue in the PostgreSQL database."""
    if settings.store_url:
        from rag.store.pg_jobs import PostgresJobLog

        return PostgresJobLog.from_settings(settings)
    from rag.store.jobs import JobLog

    return JobLog(settings.index_dir)


def open_key_store(settings: Settings):
    """Where API keys (their digests, collections and roles) are kept: beside the index."""
    if settings.store_url:
        from rag.store.pg_keys import PostgresKeyStore  # psycopg only when configured

        return PostgresKeyStore.from_settings(settings)
    from rag.store.keys import EmbeddedKeyStore

    return EmbeddedKeyStore(settings.index_dir)


__all__ = ["DEFAULT_COLLECTION", "CommitInfo", "CompactionInfo", "DocumentRecord", "EmbeddedStore", "IndexBusyError",
           "IndexMismatchError", "IndexNotFoundError", "Manifest", "Store", "StoreError", "begin_store",
           "check_collection", "compact", "open_job_log", "open_key_store", "open_store",
           "recorded_chunking"]
