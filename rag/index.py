"""`Index`: the one object the CLI and the API use to open, refresh, list, delete, compact and report on an index.

    >>> index = Index.open(Settings(index_dir="rag-index"))  # doctest: +SKIP
    >>> index.stats()["counts"]  # doctest: +SKIP
    {'documents': 44, 'chunks': 749, 'vectors': 749}

Reads go through one open store (embedded or PostgreSQL, as configured) that `refresh()` brings up to date with
what other processes committed. Document operations take a collection and pass it to the store's queries: a
document of another collection is "not found", exactly like one that does not exist.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from rag.config import Settings
from rag.errors import NotFoundError
from rag.store import CompactionInfo, DocumentRecord, begin_store, open_store
from rag.types import ALL_COLLECTIONS, Chunk

if TYPE_CHECKING:  # imported when used: `rag documents list` need not load numpy's retrieval stack
    from rag.retrieve import Retriever


# A document as `rag documents list --json` and GET /v1/documents show it: the record without what only ingestion
# reads (modification time, chunk settings).
LISTED_FIELDS = ("doc_id", "collection", "source", "content_hash", "size", "chunk_count", "ingested_at", "warnings")


def listed(record: DocumentRecord) -> dict:
    """A document as users and API clients see it: `source` is its name, never its path on the server."""
    return {name: record.name if name == "source" else getattr(record, name) for name in LISTED_FIELDS}


class DocumentNotFoundError(NotFoundError):
    """No document with this id in the collection."""

    code = "document_not_found"


class ChunkNotFoundError(NotFoundError):
    """No chunk with this id in the collection (a later ingestion may have replaced it)."""

    code = "chunk_not_found"


class Index:
    def __init__(self, settings: Settings, store):
        self.settings = settings
        self.store = store

    def retriever(self, embedder) -> "Retriever":
        """The retriever over this index: the one place a store is joined to its query encoder (the API passes
        its batching encoder, everything else the settings' `Embedder`) and to the reranker the settings ask for."""
        from rag.rerank import Reranker
        from rag.retrieve import Retriever

        reranker = Reranker.from_settings(self.settings) if self.settings.rerank else None
        return Retriever(self.store, embedder, reranker=reranker, rerank_candidates=self.settings.rerank_candidates)

    @classmethod
    def open(cls, settings: Settings, embedding_model: str | None = None, dimension: int | None = None) -> "Index":
        """Open the configured index (an embedded one of the older snapshot format is converted in place first)."""
        if not settings.store_url:
            from rag.store.snapshot_format import convert_snapshot_format

            convert_snapshot_format(settings.index_dir)
        return cls(settings, open_store(settings, embedding_model, dimension))

    def refresh(self) -> bool:
        """Pick up commits and compactions made since (by this or another process); True when there were any."""
        return self.store.refresh()

    def documents(self, collection: str) -> list[DocumentRecord]:
        return sorted(self.store.documents(collection=collection).values(), key=lambda record: record.source)

    def counts(self, collection: str) -> dict[str, int]:
        return self.store.counts(collection=collection)

    def document(self, doc_id: str, collection: str) -> DocumentRecord:
        record = self.store.document(doc_id, collection=collection)
        if record is None:
            raise DocumentNotFoundError(f"No document '{doc_id[:64]}' in the index." if collection == ALL_COLLECTIONS
                                        else f"No document '{doc_id[:64]}' in collection '{collection}'.")
        return record

    def chunk(self, chunk_id: int, collection: str) -> Chunk:
        found = self.store.get([chunk_id], collection=collection)  # another collection's chunk: none
        if not found:
            raise ChunkNotFoundError(f"No chunk {chunk_id} in the current index (a later ingestion may have "
                                     "replaced it: ask again).")
        return found[0]

    def delete(self, doc_id: str, collection: str) -> DocumentRecord:
        """Remove one document of the collection (its rows at once, its vectors as tombstones until compaction)."""
        record = self.document(doc_id, collection)
        manifest = self.store.manifest
        writer = begin_store(self.settings, manifest.embedding_model, manifest.dimension, manifest.chunking)
        try:
            writer.delete([record.doc_id])
            writer.commit()
        finally:
            writer.close()
        self.refresh()
        return record

    def compact(self, full: bool = True) -> CompactionInfo | None:
        """Merge segments and drop deleted vectors; without `full`, only when the settings' policy asks for it."""
        info = self.store.compact(full=full, max_segments=self.settings.compact_max_segments,
                                  tombstone_ratio=self.settings.compact_tombstone_ratio)
        self.refresh()
        return info

    def stats(self) -> dict:
        """The manifest, counts, collections and the backend's detail (segments, bytes on disk); the same fields for
        `rag index stats --json` and the API."""
        return {**asdict(self.store.manifest), "counts": self.store.counts(collection=ALL_COLLECTIONS),
                "collections": self.store.collections(), **self.store.stats()}

    def close(self) -> None:
        self.store.close()
