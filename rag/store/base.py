"""The store interface: what the ingestion job, the retriever and the `Index` need from an index backend.

Two backends implement it: the embedded one (`rag.store.embedded`: SQLite + FAISS segments in a directory, the
default) and the server one (`rag.store.postgres`: PostgreSQL + pgvector, selected by `RAG_STORE_URL`). Writes are
buffered between `begin` and `commit` and become visible all at once; reads only ever see committed documents.

Every document belongs to one collection. Reads take `collection`: a name scopes the read inside the store's own
query (an SQL condition, a FAISS id selector), so nothing of another collection is ever returned or counted;
`None` reads every collection and is for maintenance only (`rag index stats`, compaction, admin keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Protocol

import numpy as np

from rag.errors import ConflictError, NotFoundError, RagError
from rag.types import DEFAULT_COLLECTION, Chunk, check_collection  # noqa: F401  (re-exported for backends)


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
    collection: str = DEFAULT_COLLECTION
    # What of the file is not in the index or was read by a guess (pages without a text layer, a guessed
    # encoding): the warnings of the ingest that added it, kept for as long as the document is. The stores write and
    # read it as JSON.
    warnings: tuple[str, ...] = ()
    # The name users and API clients see instead of `source` (a path on the server): the path below the folder it
    # was ingested from, or the uploaded file's name. Documents from before it was kept are shown by their file name.
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", PurePath(self.source).name)


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


@dataclass
class PendingChanges:
    """A writer's changes until its commit, the same for every backend: documents to add (with their chunks and
    vectors), document ids whose committed version goes, and new modification times of unchanged files."""

    adds: dict[str, tuple[DocumentRecord, list[Chunk], np.ndarray]] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)
    touches: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, record: DocumentRecord, chunks: list[Chunk], vectors: np.ndarray, dimension: int) -> None:
        """Insert (or replace) one document with its chunks and their vectors."""
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        if vectors.size and vectors.shape[1] != dimension:
            raise IndexMismatchError(f"vectors have {vectors.shape[1]} dimensions, index has {dimension}")
        self.deletes.add(record.doc_id)  # whatever version is committed goes; a no-op for a new document
        self.touches.pop(record.doc_id, None)
        self.adds[record.doc_id] = (record, list(chunks), np.asarray(vectors, dtype=np.float32))

    def delete(self, doc_ids: list[str]) -> int:
        """Drop these documents (buffered and committed); returns how many buffered chunks were dropped."""
        dropped = 0
        for doc_id in doc_ids:
            added = self.adds.pop(doc_id, None)
            dropped += len(added[1]) if added else 0
            self.touches.pop(doc_id, None)
        self.deletes.update(doc_ids)
        return dropped

    def touch(self, doc_id: str, size: int, mtime_ns: int) -> None:
        self.touches[doc_id] = (size, mtime_ns)


class BufferedWriter:
    """What both backends' writers share: changes wait in `_pending` (a `PendingChanges`) until `commit`, each
    store checking first that it was opened to write (`_require_writable`) and knowing its vectors' dimension
    (`_writer_config[1]`)."""

    _pending: PendingChanges
    _writer_config: tuple | None

    def _require_writable(self) -> None:
        raise NotImplementedError

    def add_document(self, record: DocumentRecord, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Insert (or replace) one document with its chunks and their vectors."""
        self._require_writable()
        self._pending.add(record, chunks, vectors, self._writer_config[1])

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        """Record a new modification time for a file whose content did not change."""
        self._require_writable()
        self._pending.touch(doc_id, size, mtime_ns)


class Store(Protocol):
    """One index. Readers come from `open`, the single writer from `begin` ... `commit` (or `abort`)."""

    @classmethod
    def open(cls, location, embedding_model: str | None = None, dimension: int | None = None) -> "Store": ...

    @classmethod
    def begin(cls, location, embedding_model: str, dimension: int, chunking: dict) -> "Store": ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def chunking(self) -> dict: ...  # the manifest's `chunking`, read without counting what the index holds

    # reading (committed state); `collection` None = every collection
    def refresh(self) -> bool: ...  # True when another commit became visible
    def dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
              collection: str) -> list[tuple[int, float]]: ...
    def lexical(self, query: str, k: int, allowed: np.ndarray | None = None, *,
                collection: str) -> list[tuple[int, float]]: ...
    def search(self, vector: np.ndarray, k: int, *, collection: str) -> list[tuple[Chunk, float]]: ...
    def get(self, ids: Iterable[int], *, collection: str) -> list[Chunk]: ...
    def iter_chunks(self, *, collection: str) -> Iterator[Chunk]: ...
    def ids_with_source(self, pattern: str, *, collection: str) -> np.ndarray: ...
    def documents(self, *, collection: str) -> dict[str, DocumentRecord]: ...  # by doc_id
    def document(self, doc_id: str, *, collection: str) -> DocumentRecord | None: ...
    def counts(self, *, collection: str) -> dict[str, int]: ...  # documents, chunks, vectors
    def collections(self) -> dict[str, int]: ...  # name -> documents
    def stats(self) -> dict: ...  # backend detail for `rag index stats` (segments, bytes on disk...)

    # maintenance
    def compact(self, full: bool = True, max_segments: int = 8,
                tombstone_ratio: float = 0.2) -> CompactionInfo | None: ...

    # writing (buffered until commit)
    def add_document(self, record: DocumentRecord, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def delete(self, doc_ids: Iterable[str]) -> int: ...
    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None: ...
    def commit(self) -> CommitInfo: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
