"""The store interface: what the ingestion job, the retriever and the `Index` need from an index backend.

The embedded backend (`rag.store.embedded`: SQLite + FAISS segments in a directory) implements it today; a
server backend (PostgreSQL + pgvector) can implement the same protocol. Writes are buffered between `begin` and
`commit` and become visible all at once; reads only ever see committed documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from rag.errors import ConflictError, NotFoundError, RagError
from rag.types import Chunk


class StoreError(RagError):
    """The index cannot be used as asked; the message says why and what to do."""


class IndexNotFoundError(StoreError, NotFoundError):
    """No index at the configured location."""


class IndexMismatchError(StoreError, ConflictError):
    """The index was built with another embedding model or dimension, or in a format this version cannot read."""


class IndexBusyError(StoreError, ConflictError):
    """Another process holds the index's writer (or compaction) lock."""

    code = "index_busy"


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    doc_id: str
    source: str
    content_hash: str
    size: int
    mtime_ns: int
    chunking: str  # the chunk settings the document was split with, as JSON
    chunk_count: int
    ingested_at: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an index is: its embedding model and chunking, and (as of the last commit) what it holds."""

    embedding_model: str
    dimension: int
    chunking: dict
    index_type: str = "IDMap2,Flat"  # of the largest vector segment
    metric: str = "inner_product"
    documents: int = 0
    chunks: int = 0
    vectors: int = 0
    segments: int = 0
    tombstones: int = 0  # deleted vectors still present in a segment, until compaction drops them
    generation: int = 0  # bumped by every commit and compaction
    created_at: str = ""  # time of the last commit
    snapshot: str = ""  # the generation's name, e.g. "g000042" (the field name predates segments)
    format_version: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CommitInfo:
    generation: int
    name: str  # what `IngestReport.snapshot` and the API's `snapshot` fields show
    chunks_added: int
    chunks_deleted: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CompactionInfo:
    generation: int
    segments_before: int
    segments_after: int
    vectors: int
    tombstones_dropped: int
    index_type: str
    seconds: float


class Store(Protocol):
    """One index. Readers come from `open`, the single writer from `begin` ... `commit` (or `abort`)."""

    @classmethod
    def open(cls, location, embedding_model: str | None = None, dimension: int | None = None) -> "Store": ...

    @classmethod
    def begin(cls, location, embedding_model: str, dimension: int, chunking: dict) -> "Store": ...

    @property
    def manifest(self) -> Manifest: ...

    # reading (committed state)
    def refresh(self) -> bool: ...  # True when another commit became visible
    def dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]: ...
    def lexical(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]: ...
    def search(self, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]: ...
    def get(self, ids: Iterable[int]) -> list[Chunk]: ...
    def iter_chunks(self) -> Iterator[Chunk]: ...
    def ids_with_source(self, pattern: str) -> np.ndarray: ...
    def documents(self) -> dict[str, DocumentRecord]: ...
    def counts(self) -> dict[str, int]: ...

    # writing (buffered until commit)
    def add_document(self, record: DocumentRecord, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def delete(self, doc_ids: Iterable[str]) -> int: ...
    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None: ...
    def commit(self) -> CommitInfo: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
