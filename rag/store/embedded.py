"""The embedded store: SQLite (rows, full-text index, segment list, tombstones) + immutable FAISS segment files.

Kept over 400 lines on purpose: commit, compaction and migration share one crash-safety argument (below), which
is easier to check in one file.

Layout of an index directory::

    index/
      store.sqlite        WAL: meta, documents, chunks, chunks_fts (FTS5 over chunks), segments, tombstones, jobs,
                          api_keys
      segments/<name>.faiss   FAISS IndexIDMap2 (flat, or IVF for a large segment), ids = chunk ids; immutable
      .lock               held by the one writer;  .compact.lock  held by the one compactor

A write is buffered until `commit`, which (1) writes the new vectors as one segment file (temp name, fsync,
rename, fsync dir) and then (2) applies everything in one SQLite transaction: deleted chunk rows (their ids go to
`tombstones` and their postings leave FTS5 through triggers), new rows, the new segment's registration and a new
generation. A kill before (2) commits leaves an unregistered file, removed by the next writer; after it, the
commit is whole. Readers search every registered segment, skip tombstoned ids, and merge by score; they reload
when the generation changes, reusing the segments they already hold. Compaction merges a fixed set of segments
into one (dropping tombstoned vectors) outside any lock but its own, then swaps it in with one transaction that
keeps tombstones recorded meanwhile. Ids are never reused, so a tombstone can only ever hide the chunk it was for.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath

import faiss
import numpy as np

from rag.store.base import (CommitInfo, CompactionInfo, DocumentRecord, IndexBusyError, IndexMismatchError,
                            IndexNotFoundError, Manifest, PendingChanges, StoreError)
from rag.store.terms import indexed_terms, match_query, rarest_within, terms
from rag.types import ALL_COLLECTIONS, Chunk, collection_filter

FORMAT_VERSION = 2
DB_FILE = "store.sqlite"
SEGMENTS = "segments"
LOCK_FILE = ".lock"
COMPACT_LOCK_FILE = ".compact.lock"
# A segment at least this large gets an approximate (IVF) index. Exact search costs 0.6 ms at 10k vectors,
# 3.1 ms at 50k and 7.5 ms at 100k (384 dims, 2 cores), ~150 ms at 1M. HNSW was the first choice, but building it
# took 160-210 s for 50k vectors on these 2 (shared) cores, so an IVF of √n lists, trained on a sample, is built
# instead; bench/scale.py measures its recall@10 against exact search.
ANN_THRESHOLD = 50_000
IVF_TRAINING_PER_LIST = 50  # k-means training points per list (faiss asks for ≥ 39)
# Lists searched per query: an eighth of them, at least 64. bench/scale.py (recall@10 against exact search):
# 100k vectors, 316 lists: 64 → 0.971; 1M vectors, 1000 lists: 64 → 0.931, 128 → 0.988 (+5 ms).
# A search through an id selector (a collection, a source filter, tombstones) that lets through a share s of the
# stored vectors probes 1/s times as many lists, at most all (`search_parameters`): it then meets as many eligible
# vectors as a search without one, at about its cost (a vector outside the selector costs a bit test, no distance).
# With the usual probes, recall@10 fell as the scope narrowed (100k vectors, 316 lists, 64 probes: 0.96 at a 50%
# scope, 0.92 at 10%, 0.80 at 1%, 0.57 at 0.1%) while the answer almost never held fewer than k hits, so searching
# again on a short answer would not have helped; widened: 0.998 at 50%, and at 20% or less all lists, i.e. an exact
# search of the scope's own vectors (1.6 ms at 1%). s is the whole index's share, not the segment's: a segment
# holding less of the scope probes too few lists, but then it also holds few of the scope's best hits.
IVF_MIN_PROBES = 64
IVF_PROBE_SHARE = 1 / 8
# FTS5 spends ~3 µs ranking each matching row, so a query's cost grows with the postings of its terms. A query
# ranks with its rarest terms (highest IDF) whose postings together stay within this budget, and drops the commoner
# ones (as Elasticsearch's cutoff_frequency does): bounded latency at any index size. Small indexes (XQuAD's 300
# chunks) never reach the budget, so they rank with every term.
LEXICAL_POSTINGS_BUDGET = 5_000  # ~15-25 ms a query on these shared 2 cores (bench/scale.py)
BUSY_TIMEOUT_MS = 30_000
WAL_SIZE_LIMIT = 64 * 2**20

DOCUMENTS_TABLE = """(
    doc_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    chunking TEXT NOT NULL,
    chunk_count INTEGER NOT NULL,
    ingested_at TEXT NOT NULL,
    collection TEXT NOT NULL DEFAULT 'default',
    UNIQUE (collection, source)
)"""
# Columns added after a release, to new databases and to older ones alike, when a writer or reader opens them.
ADDED_COLUMNS = {"documents": {"warnings": "TEXT NOT NULL DEFAULT '[]'",  # JSON list (DocumentRecord.warnings)
                               "name": "TEXT NOT NULL DEFAULT ''"},  # '' in older indexes: shown by file name
                 "chunks": {"name": "TEXT NOT NULL DEFAULT ''"}}  # its document's name, so a read needs no join
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents {DOCUMENTS_TABLE};
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    page INTEGER,
    heading TEXT,
    element_type TEXT,
    tokens INTEGER NOT NULL,
    hash TEXT NOT NULL,
    context TEXT NOT NULL DEFAULT '',
    collection TEXT NOT NULL DEFAULT 'default',  -- its document's, so a collection's chunk ids need no join
    UNIQUE (doc_id, ordinal)
);
-- Contentless: the text is stored once (in chunks); FTS5 keeps only postings of the chunk's analysed terms
-- (rag.store.terms, registered as the SQL function rag_terms), in its own incrementally merged b-tree segments.
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    terms, content='', tokenize="unicode61 remove_diacritics 0 tokenchars '_'");
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts_terms USING fts5vocab(chunks_fts, row);  -- document frequencies
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, terms) VALUES (new.id, rag_terms(new.context, new.text));
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, terms) VALUES ('delete', old.id, rag_terms(old.context, old.text));
    INSERT OR IGNORE INTO tombstones(chunk_id) VALUES (old.id);
END;
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    index_type TEXT NOT NULL,
    vectors INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (chunk_id INTEGER PRIMARY KEY);
"""
CHUNK_COLUMNS = "id, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash, context, name"
INSERT_CHUNK = ("INSERT INTO chunks (id, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash,"
                " context, collection, name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
DOCUMENT_COLUMNS = ", ".join(DocumentRecord.__dataclass_fields__)
INSERT_DOCUMENT = f"INSERT INTO documents ({DOCUMENT_COLUMNS}) VALUES ({', '.join('?' * len(DocumentRecord.__dataclass_fields__))})"


def crash_point(name: str) -> None:
    """Tests only: `RAG_TEST_CRASH_AT=<name>` kills the process here, as a power cut or kill -9 would."""
    if os.environ.get("RAG_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(index_dir: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, full fsync on commit."""
    db = sqlite3.connect(index_dir / DB_FILE, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")  # a bulk commit's WAL shrinks back after checkpoint
    db.execute("PRAGMA foreign_keys = ON")
    register_functions(db)
    if readonly:
        db.execute("PRAGMA query_only = ON")
    return db


def register_functions(db: sqlite3.Connection) -> None:
    """The SQL functions the schema's triggers call (every connection that writes chunk rows needs them)."""
    db.create_function("rag_terms", 2, indexed_terms, deterministic=True)


def ensure_schema(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)
    upgrade(db)
    db.execute("CREATE INDEX IF NOT EXISTS chunks_collection ON chunks(collection)")


def upgrade(db: sqlite3.Connection) -> None:
    """Bring an index built by an earlier version to this schema (a no-op when it is there)."""
    add_collections(db)
    add_columns(db, ADDED_COLUMNS)


def outdated(db: sqlite3.Connection) -> bool:
    """Whether `upgrade` has something to do (checked without the write lock that it takes)."""
    return not _has_column(db, "documents", "collection") or any(
        not _has_column(db, table, column) for table, columns in ADDED_COLUMNS.items() for column in columns)


def add_columns(db: sqlite3.Connection, added: dict[str, dict[str, str]]) -> None:
    """Add the columns (by table: name → definition) a table lacks; SQLite adds a column without rewriting rows."""
    for table, columns in added.items():
        for column, definition in columns.items():
            if not _has_column(db, table, column):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock at once, waiting busy_timeout for another writer) ... COMMIT; rolled back
    on any exception, so a change is applied whole or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    return column in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def add_collections(db: sqlite3.Connection) -> None:
    """Give an index built before collections its `collection` columns (everything joins 'default').

    `documents.source` was UNIQUE on its own, so that table is rebuilt (SQLite cannot alter a constraint): the
    documented procedure, with foreign keys off so that dropping the old table does not cascade to the chunks.
    One transaction: a kill leaves the old schema or the new one."""
    if _has_column(db, "documents", "collection"):
        return
    db.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction, so before BEGIN
    try:
        with write_transaction(db):
            if not _has_column(db, "documents", "collection"):  # another process may have done it meanwhile
                db.execute(f"CREATE TABLE documents_upgraded {DOCUMENTS_TABLE}")
                old = {row[1] for row in db.execute("PRAGMA table_info(documents)")}
                columns = ", ".join(name for name in DocumentRecord.__dataclass_fields__ if name in old)
                db.execute(f"INSERT INTO documents_upgraded ({columns}) SELECT {columns} FROM documents")
                db.execute("DROP TABLE documents")
                db.execute("ALTER TABLE documents_upgraded RENAME TO documents")
                if not _has_column(db, "chunks", "collection"):
                    db.execute("ALTER TABLE chunks ADD COLUMN collection TEXT NOT NULL DEFAULT 'default'")
    finally:
        db.execute("PRAGMA foreign_keys = ON")


def _document(row: tuple) -> DocumentRecord:
    *rest, warnings, name = row  # warnings as JSON text
    return DocumentRecord(*rest, tuple(json.loads(warnings)), name)


def _document_row(record: DocumentRecord) -> tuple:
    *rest, warnings, name = astuple(record)
    return (*rest, json.dumps(warnings), name)


def _row_to_chunk(row: tuple) -> Chunk:
    id_, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash_, context, name = row
    return Chunk(doc_id, ordinal, text, source, page, heading, element_type, tokens, hash_, id_, context,
                 name or PurePath(source).name)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _lock(path: Path, what: str) -> object:
    handle = open(path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexBusyError(f"Another process is {what} the index at '{path.parent}'; try again when it ends.")
    return handle


def build_segment_index(vectors: np.ndarray, ids: np.ndarray, dimension: int) -> faiss.Index:
    """Exact inner-product search for a small segment; an inverted-file index for one large enough to make exact
    search slow. Both wrapped in IDMap2 (ids = chunk ids) so segments read and merge alike."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(ids) >= ANN_THRESHOLD:
        lists = max(1, int(np.sqrt(len(ids))))
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), lists * IVF_TRAINING_PER_LIST),
                                                 replace=False)
        inner.train(vectors[np.sort(sample)])
        inner.set_direct_map_type(faiss.DirectMap.Array)  # so compaction can read the vectors back
        inner.nprobe = probes(lists)
    else:
        inner = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIDMap2(inner)
    if len(ids):
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    return index


def index_type(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index)
    return f"IDMap2,IVF{inner.nlist},Flat" if isinstance(inner, faiss.IndexIVF) else "IDMap2,Flat"


def segment_contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) held by a segment."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal), ids


def write_segment(index_dir: Path, name: str, index: faiss.Index) -> Path:
    """Write a segment file so that it exists either whole or (as a temp name) not at all."""
    folder = index_dir / SEGMENTS
    folder.mkdir(exist_ok=True)
    final, temp = folder / f"{name}.faiss", folder / f"{name}.faiss.tmp"
    faiss.write_index(index, str(temp))
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)
    _fsync_dir(folder)
    return final


def read_segment(index_dir: Path, name: str) -> faiss.Index:
    index = faiss.read_index(str(index_dir / SEGMENTS / f"{name}.faiss"))
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = probes(inner.nlist)
    return index


def probes(lists: int) -> int:
    return min(lists, max(IVF_MIN_PROBES, int(lists * IVF_PROBE_SHARE)))


def search_parameters(index: faiss.Index, selector: faiss.IDSelector | None,
                      share: float) -> faiss.SearchParameters | None:
    """How to search a segment through `selector`, which lets through `share` (0 < share ≤ 1) of the stored
    vectors. An IVF index takes only its own parameter type (and with it probes one list unless told): the
    segment's probes, widened by 1 / share (see IVF_PROBE_SHARE)."""
    if selector is None:
        return None
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParameters(sel=selector)
    return faiss.SearchParametersIVF(sel=selector, nprobe=min(inner.nlist, math.ceil(inner.nprobe / share)))


def new_segment_name(kind: str = "s") -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{kind}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class _Vectors:
    """What a reader searches: the generation's segments (loaded) and a selector that skips tombstoned ids."""

    generation: int
    segments: dict[str, faiss.Index]
    tombstones: np.ndarray
    skip: tuple | None  # (IDSelectorNot over the tombstones, its inner IDSelectorBatch, kept alive with it)

    @property
    def ntotal(self) -> int:
        return sum(index.ntotal for index in self.segments.values()) - len(self.tombstones)


class EmbeddedStore:
    """An index directory: read it with `EmbeddedStore.open`, change it with `begin` ... `commit`.

    >>> store = EmbeddedStore.open("rag-index")  # doctest: +SKIP
    >>> [(chunk.source, score) for chunk, score in store.search(query_vector, k=3, collection="default")]  # doctest: +SKIP
    """

    def __init__(self, index_dir: Path, lock_handle=None, embedding_model: str = "", dimension: int = 0,
                 chunking: dict | None = None):
        self.index_dir = index_dir
        self.directory = index_dir  # where the index lives (kept from the snapshot era for callers that print it)
        self._lock_handle = lock_handle  # set only on a writer
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._vectors: _Vectors | None = None
        self._load_lock = threading.Lock()
        self._writer_config = (embedding_model, dimension, chunking or {})
        self._pending = PendingChanges()  # a writer's changes until commit
        # (generation, {collection: its chunk ids, or None when it holds every chunk}), filled as reads ask
        self._scopes: tuple[int, dict[str, np.ndarray | None]] = (-1, {})

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, index_dir: str | Path, embedding_model: str | None = None,
             dimension: int | None = None) -> "EmbeddedStore":
        """Open for reading; with a model name/dimension, refuse an index built otherwise. Vectors load lazily."""
        index_dir = Path(index_dir)
        if not (index_dir / DB_FILE).exists():
            if (index_dir / "CURRENT").is_symlink():
                raise IndexMismatchError(
                    f"Index at '{index_dir}' is in the snapshot format of earlier versions. Convert it in place "
                    f"with `rag index compact --index {index_dir}` (any `rag ingest` into it does too).")
            raise IndexNotFoundError(f"No index at '{index_dir}'. Build one with `rag ingest PATH --index {index_dir}`.")
        store = cls(index_dir)
        meta = store._meta()
        if "embedding_model" not in meta:  # the database exists (e.g. jobs recorded) but nothing was committed yet
            store.close()
            raise IndexNotFoundError(f"No index at '{index_dir}' yet. Build one with `rag ingest PATH --index "
                                     f"{index_dir}` or upload documents.")
        check_compatible(meta, index_dir, embedding_model, dimension)
        if outdated(store.db):  # built by an earlier version: upgrade in place
            upgrading = connect(index_dir)
            try:
                upgrade(upgrading)
            finally:
                upgrading.close()
        return store

    @classmethod
    def begin(cls, index_dir: str | Path, embedding_model: str, dimension: int, chunking: dict) -> "EmbeddedStore":
        """The writer (creating the index if needed). Only one at a time; changes are buffered until `commit`."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        lock_handle = _lock(index_dir / LOCK_FILE, "writing to")
        try:
            migrate_snapshot_format(index_dir)
            store = cls(index_dir, lock_handle, embedding_model, dimension, chunking)
            ensure_schema(store.db)
            meta = store._meta()
            if "embedding_model" in meta:
                check_compatible(meta, index_dir, embedding_model, dimension)
            remove_orphan_segments(index_dir, store.db)
        except BaseException:
            lock_handle.close()
            raise
        return store

    # ---------------------------------------------------------------- reading
    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections must not be shared by threads running queries at once)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect(self.index_dir, readonly=self._lock_handle is None)
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _meta(self) -> dict[str, str]:
        try:
            return dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:  # a database without our tables yet
            return {}

    @property
    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    @property
    def chunking(self) -> dict:
        """How the index's documents were last chunked and embedded (a writer's own settings before its commit)."""
        chunking = self._meta().get("chunking")
        return json.loads(chunking) if chunking is not None else self._writer_config[2]

    @property
    def manifest(self) -> Manifest:
        meta = self._meta()
        if "embedding_model" not in meta:
            model, dimension, chunking = self._writer_config
            return Manifest(embedding_model=model, dimension=dimension, chunking=chunking)
        segments = self.db.execute("SELECT index_type, vectors FROM segments ORDER BY vectors DESC").fetchall()
        generation = int(meta.get("generation", 0))
        return Manifest(
            embedding_model=meta["embedding_model"], dimension=int(meta["dimension"]),
            chunking=json.loads(meta["chunking"]), index_type=segments[0][0] if segments else "IDMap2,Flat",
            **self.counts(collection=ALL_COLLECTIONS), segments=len(segments), tombstones=self._count("tombstones"),
            generation=generation,
            created_at=meta.get("committed_at", ""), snapshot=generation_name(generation),
            format_version=int(meta.get("format_version", FORMAT_VERSION)))

    def _count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def counts(self, *, collection: str) -> dict[str, int]:
        db, collection = self.db, collection_filter(collection)
        if collection is not None:  # a collection's live vectors are its chunk rows (deleted rows are tombstoned)
            documents, chunks = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0) FROM documents WHERE collection = ?",
                (collection,)).fetchone()
            return {"documents": documents, "chunks": chunks, "vectors": chunks}
        db.execute("BEGIN")  # one read transaction: the three numbers describe the same generation
        try:
            documents = db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            chunks = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            stored = db.execute("SELECT COALESCE(SUM(vectors), 0) FROM segments").fetchone()[0]
            dead = db.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]
        finally:
            db.execute("COMMIT")
        return {"documents": documents, "chunks": chunks, "vectors": stored - dead}

    def __len__(self) -> int:
        return self._loaded().ntotal

    def refresh(self) -> bool:
        """Load what another process committed since; False when nothing changed. Cheap when nothing did."""
        with self._load_lock:
            current = self._vectors
            if current is not None and current.generation == self.generation:
                return False
            for attempt in range(5):
                try:
                    self._vectors = self._load_vectors(current)
                    return True
                except FileNotFoundError:  # a compaction removed a segment between our reads: read the list again
                    time.sleep(0.05 * (attempt + 1))
            raise StoreError(f"Could not load the vector segments of '{self.index_dir}' (they kept changing).")

    def _load_vectors(self, previous: _Vectors | None) -> _Vectors:
        db = self.db
        db.execute("BEGIN")
        try:
            generation = self.generation
            names = [row[0] for row in db.execute("SELECT name FROM segments ORDER BY name")]
            tombstones = np.fromiter((row[0] for row in db.execute("SELECT chunk_id FROM tombstones")), np.int64)
        finally:
            db.execute("COMMIT")
        held = previous.segments if previous else {}
        segments = {name: held[name] if name in held else read_segment(self.index_dir, name) for name in names}
        skip = None
        if len(tombstones):
            batch = faiss.IDSelectorBatch(tombstones)
            skip = (faiss.IDSelectorNot(batch), batch)  # the Not selector does not own its inner one
        return _Vectors(generation, segments, tombstones, skip)

    def _loaded(self) -> _Vectors:
        if self._vectors is None:
            self.refresh()
        return self._vectors

    def _scope(self, collection: str, allowed: np.ndarray | None) -> np.ndarray | None:
        """The ids a read may return: `allowed` within the collection; None for no restriction (every chunk)."""
        collection = collection_filter(collection)
        if collection is None:
            return allowed
        generation, scopes = self._scopes
        if generation != self.generation:
            generation, scopes = self.generation, {}
            self._scopes = (generation, scopes)
        if collection not in scopes:
            others = self.db.execute("SELECT EXISTS (SELECT 1 FROM documents WHERE collection != ?)",
                                     (collection,)).fetchone()[0]
            scopes[collection] = None if not others else np.fromiter(  # alone in the index: no selector needed
                (row[0] for row in self.db.execute("SELECT id FROM chunks WHERE collection = ?", (collection,))),
                np.int64)
        ids = scopes[collection]
        if ids is None:
            return allowed
        return ids if allowed is None else np.intersect1d(ids, allowed)

    def dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
              collection: str) -> list[tuple[int, float]]:
        """(chunk id, inner product) best first, over every live segment; `allowed` and `collection` restrict the
        ids (through FAISS's id selector, so the k results are the best k within them)."""
        vectors = self._loaded()
        allowed = self._scope(collection, allowed)
        if k <= 0 or (allowed is not None and not len(allowed)):
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        # One query at a time gains nothing from FAISS's OpenMP threads, and their spin-waiting after each search
        # fights torch's threads in the next query embedding (13.8 ms → 6.2 ms per query on 2 cores). Per thread.
        faiss.omp_set_num_threads(1)
        selector = faiss.IDSelectorBatch(allowed) if allowed is not None else (vectors.skip or (None,))[0]
        # The share of the stored vectors the selector lets through, by which IVF segments widen their probes.
        eligible = len(allowed) if allowed is not None else vectors.ntotal
        share = min(1.0, max(eligible, 1) / max(vectors.ntotal + len(vectors.tombstones), 1))
        hits: list[tuple[int, float]] = []
        for index in vectors.segments.values():
            if index.ntotal == 0:
                continue
            params = search_parameters(index, selector, share)
            scores, ids = index.search(query, min(k, index.ntotal), params=params)
            hits.extend((int(id_), float(score)) for id_, score in zip(ids[0], scores[0]) if id_ != -1)
        hits.sort(key=lambda hit: (-hit[1], hit[0]))
        return hits[:k]

    def lexical(self, query: str, k: int, allowed: np.ndarray | None = None, *,
                collection: str) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) best first, from SQLite FTS5; chunks sharing no term with the query are left out.
        Term statistics are the whole index's: a collection changes which chunks come back, not how they rank."""
        allowed = self._scope(collection, allowed)
        match = match_query(self._discriminating_terms(query))
        if match is None or k <= 0 or (allowed is not None and not len(allowed)):
            return []
        sql = "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank"
        if allowed is None:
            return [(int(id_), float(score)) for id_, score in self.db.execute(sql + " LIMIT ?", (match, k))]
        allowed_set = set(allowed.tolist())
        hits = []
        for id_, score in self.db.execute(sql, (match,)):
            if id_ in allowed_set:
                hits.append((int(id_), float(score)))
                if len(hits) == k:
                    break
        return hits

    def _discriminating_terms(self, query: str) -> list[str]:
        """The query's rarest terms whose postings fit LEXICAL_POSTINGS_BUDGET (at least the rarest one)."""
        words = list(dict.fromkeys(terms(query)))
        if len(words) < 2:
            return words
        frequency = dict(self.db.execute(f"SELECT term, doc FROM chunks_fts_terms WHERE term IN "
                                         f"({','.join('?' * len(words))})", words))
        return rarest_within(words, frequency, LEXICAL_POSTINGS_BUDGET)

    def search(self, vector: np.ndarray, k: int, *, collection: str) -> list[tuple[Chunk, float]]:
        hits = self.dense(vector, k, collection=collection)
        chunks = {chunk.id: chunk for chunk in self.get([id_ for id_, _ in hits], collection=collection)}
        return [(chunks[id_], score) for id_, score in hits if id_ in chunks]

    def get(self, ids: Iterable[int], *, collection: str) -> list[Chunk]:
        """The chunks with these ids, in the order given; ids not in the index (or not in `collection`) are left
        out."""
        ids = list(ids)
        scope, scope_args = _collection_condition(collection)
        by_id = {}
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            rows = self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE id IN ({','.join('?' * len(batch))})"
                                   f"{scope}", (*batch, *scope_args))
            by_id.update((row[0], _row_to_chunk(row)) for row in rows)
        return [by_id[id_] for id_ in ids if id_ in by_id]

    def iter_chunks(self, *, collection: str) -> Iterator[Chunk]:
        scope, scope_args = _collection_condition(collection, first=True)
        for row in self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks{scope} ORDER BY id", scope_args):
            yield _row_to_chunk(row)

    def ids_with_source(self, pattern: str, *, collection: str) -> np.ndarray:
        """Ids of the chunks whose source path matches a glob (or ends with it below some folder)."""
        import fnmatch

        suffix = f"*/{pattern.lstrip('/')}"
        scope, scope_args = _collection_condition(collection, first=True)
        doc_ids = [doc_id for doc_id, source in self.db.execute(f"SELECT doc_id, source FROM documents{scope}",
                                                                 scope_args)
                   if fnmatch.fnmatch(source, pattern) or fnmatch.fnmatch(source, suffix)]
        ids: list[int] = []
        for start in range(0, len(doc_ids), 500):
            batch = doc_ids[start:start + 500]
            ids += [row[0] for row in self.db.execute(
                f"SELECT id FROM chunks WHERE doc_id IN ({','.join('?' * len(batch))})", batch)]
        return np.asarray(ids, dtype=np.int64)

    def documents(self, *, collection: str) -> dict[str, DocumentRecord]:
        """Documents by doc_id."""
        scope, scope_args = _collection_condition(collection, first=True)
        rows = self.db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents{scope}", scope_args)
        return {row[0]: _document(row) for row in rows}

    def document(self, doc_id: str, *, collection: str) -> DocumentRecord | None:
        scope, scope_args = _collection_condition(collection)
        row = self.db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE doc_id = ?{scope}",
                              (doc_id, *scope_args)).fetchone()
        return _document(row) if row else None

    def collections(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT collection, COUNT(*) FROM documents GROUP BY collection "
                                    "ORDER BY collection"))

    def stats(self) -> dict:
        """Segments and bytes on disk, for `rag index stats`."""
        segments = [{"name": name, "index_type": kind, "vectors": vectors, "created_at": created}
                    for name, kind, vectors, created in self.db.execute(
                        "SELECT name, index_type, vectors, created_at FROM segments ORDER BY name")]
        disk = {"database": sum(path.stat().st_size for path in self.index_dir.glob(f"{DB_FILE}*")),
                "segments": sum(path.stat().st_size for path in (self.index_dir / SEGMENTS).glob("*.faiss"))}
        return {"segment_list": segments, "bytes_on_disk": {**disk, "total": sum(disk.values())},
                "path": str(self.index_dir)}

    def compact(self, full: bool = True, max_segments: int = 8,
                tombstone_ratio: float = 0.2) -> CompactionInfo | None:
        return compact(self.index_dir, full, max_segments, tombstone_ratio)

    # ---------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if self._lock_handle is None:
            raise StoreError("This store was opened read-only; use Store.begin() to change the index.")

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents with their chunks and vectors (at commit); returns the number of chunks removed."""
        self._require_writable()
        doc_ids = list(doc_ids)
        removed = self._pending.delete(doc_ids)
        for start in range(0, len(doc_ids), 500):
            batch = doc_ids[start:start + 500]
            removed += self.db.execute(
                f"SELECT COUNT(*) FROM chunks WHERE doc_id IN ({','.join('?' * len(batch))})", batch).fetchone()[0]
        return removed

    def add_document(self, record: DocumentRecord, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Insert (or replace) one document with its chunks and their vectors."""
        self._require_writable()
        self._pending.add(record, chunks, vectors, self._writer_config[1])

    def touch_document(self, doc_id: str, size: int, mtime_ns: int) -> None:
        """Record a new modification time for a file whose content did not change."""
        self._require_writable()
        self._pending.touch(doc_id, size, mtime_ns)

    def commit(self) -> CommitInfo:
        """Write the new segment, then make every buffered change visible in one transaction."""
        self._require_writable()
        started = time.perf_counter()
        db = self.db
        model, dimension, chunking = self._writer_config
        next_id = int(self._meta().get("next_chunk_id", 1))
        new_chunks = [(record, chunk) for record, chunks, _ in self._pending.adds.values() for chunk in chunks]
        ids = np.arange(next_id, next_id + len(new_chunks), dtype=np.int64)
        segment = None
        if len(new_chunks):
            vectors = np.concatenate([vectors for _, chunks, vectors in self._pending.adds.values() if len(chunks)])
            index = build_segment_index(vectors, ids, dimension)
            segment = (new_segment_name(), index_type(index), int(index.ntotal))
            write_segment(self.index_dir, segment[0], index)
        crash_point("commit-segment-written")

        with write_transaction(db):
            deleted = 0
            deletes = sorted(self._pending.deletes)
            for start in range(0, len(deletes), 500):
                batch = deletes[start:start + 500]
                marks = ",".join("?" * len(batch))
                deleted += db.execute(f"DELETE FROM chunks WHERE doc_id IN ({marks})", batch).rowcount
                db.execute(f"DELETE FROM documents WHERE doc_id IN ({marks})", batch)
            added_docs = {record.doc_id: record for record, _, _ in self._pending.adds.values()}
            db.executemany(INSERT_DOCUMENT, (_document_row(record) for record in added_docs.values()))
            db.executemany(INSERT_CHUNK, (
                (int(id_), record.doc_id, chunk.ordinal, chunk.text, chunk.source, chunk.page, chunk.heading,
                 chunk.element_type, chunk.tokens, chunk.hash, chunk.context, record.collection, record.name)
                for id_, (record, chunk) in zip(ids, new_chunks)))
            db.executemany("UPDATE documents SET size = ?, mtime_ns = ? WHERE doc_id = ?",
                           ((size, mtime, doc_id) for doc_id, (size, mtime) in self._pending.touches.items()))
            if segment:
                db.execute("INSERT INTO segments VALUES (?, ?, ?, ?)", (*segment, _now()))
            generation = self.generation + 1
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("embedding_model", model), ("dimension", str(dimension)),
                ("chunking", json.dumps(chunking, sort_keys=True)), ("format_version", str(FORMAT_VERSION)),
                ("next_chunk_id", str(next_id + len(new_chunks))), ("generation", str(generation)),
                ("committed_at", _now())])
            crash_point("commit-before-transaction-end")
        crash_point("commit-after-transaction-end")
        self._pending = PendingChanges()
        self._release()
        return CommitInfo(generation, generation_name(generation), len(new_chunks), deleted,
                          time.perf_counter() - started)

    def abort(self) -> None:
        """Drop the buffered changes; the index stays as it was."""
        self._pending = PendingChanges()
        if self._lock_handle is not None:
            self._release()

    def _release(self) -> None:
        self._lock_handle.close()
        self._lock_handle = None

    def close(self) -> None:
        if self._lock_handle is not None:
            self.abort()
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()
        self._vectors = None


def _collection_condition(collection: str, first: bool = False) -> tuple[str, tuple]:
    """The SQL condition (and its argument) that scopes a query to one collection; nothing for every collection."""
    collection = collection_filter(collection)
    if collection is None:
        return "", ()
    return (" WHERE" if first else " AND") + " collection = ?", (collection,)


def generation_name(generation: int) -> str:
    return f"g{generation:06d}"


def check_compatible(meta: dict[str, str], index_dir: Path, embedding_model: str | None,
                     dimension: int | None) -> None:
    version = int(meta.get("format_version", FORMAT_VERSION))
    if version != FORMAT_VERSION:
        raise IndexMismatchError(f"Index at '{index_dir}' has format version {version}; this program reads "
                                 f"version {FORMAT_VERSION}. Re-ingest into a new --index directory.")
    model, dims = meta["embedding_model"], int(meta["dimension"])
    if (embedding_model and embedding_model != model) or (dimension and dimension != dims):
        raise IndexMismatchError(
            f"Index at '{index_dir}' was built with embedding model '{model}' ({dims} dims), but the configured "
            f"model is '{embedding_model}' ({dimension} dims). Its vectors are not comparable: configure the same "
            "model, or ingest into a new --index directory.")


def remove_orphan_segments(index_dir: Path, db: sqlite3.Connection) -> None:
    """Segment files no commit registered (a writer or compactor killed before its transaction). Writer lock held;
    skipped while a compaction runs, since its new segment is unregistered until its swap."""
    folder = index_dir / SEGMENTS
    if not folder.exists():
        return
    try:
        compact_lock = _lock(index_dir / COMPACT_LOCK_FILE, "compacting")
    except IndexBusyError:
        return
    try:
        registered = {row[0] for row in db.execute("SELECT name FROM segments")}
        for path in folder.iterdir():
            if path.name.endswith(".tmp") or path.name.removesuffix(".faiss") not in registered:
                path.unlink(missing_ok=True)
    finally:
        compact_lock.close()


def compact(index_dir: str | Path, full: bool = True, max_segments: int = 8,
            tombstone_ratio: float = 0.2) -> CompactionInfo | None:
    """Merge segments into one, dropping tombstoned vectors; None when the policy finds nothing to do.

    `full` merges every segment (and retrains the IVF of a large result). Otherwise: all segments when tombstones exceed
    `tombstone_ratio` of the stored vectors, else the small segments (all but the largest) once there are more
    than `max_segments`. A result of ANN_THRESHOLD vectors or more gets an IVF index (retrained on its vectors). Readers and a concurrent writer are never blocked: the new segment is built from the
    inputs as they were when it started and swapped in by one short transaction.
    """
    index_dir = Path(index_dir)
    started = time.perf_counter()
    lock = _lock(index_dir / COMPACT_LOCK_FILE, "compacting")
    db = connect(index_dir)
    try:
        db.execute("BEGIN")
        try:
            segments = db.execute("SELECT name, vectors FROM segments ORDER BY vectors DESC, name").fetchall()
            tombstones = np.fromiter((row[0] for row in db.execute("SELECT chunk_id FROM tombstones")), np.int64)
            dimension = int(db.execute("SELECT value FROM meta WHERE key = 'dimension'").fetchone()[0])
        finally:
            db.execute("COMMIT")
        stored = sum(vectors for _, vectors in segments)
        if full or (stored and len(tombstones) > tombstone_ratio * stored):
            inputs = [name for name, _ in segments]
        elif len(segments) > max_segments:
            inputs = [name for name, _ in segments[1:]]
        else:
            return None
        if not inputs or (len(inputs) == 1 and not len(tombstones) and not full):
            return None
        parts, id_parts, dropped_parts = [], [], []
        for name in inputs:
            vectors, ids = segment_contents(read_segment(index_dir, name))
            keep = ~np.isin(ids, tombstones)
            parts.append(vectors[keep])
            id_parts.append(ids[keep])
            dropped_parts.append(ids[~keep])
        vectors = np.concatenate(parts) if parts else np.zeros((0, dimension), np.float32)
        ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
        dropped = np.concatenate(dropped_parts)
        merged = build_segment_index(vectors, ids, dimension)
        name = new_segment_name("c")
        if merged.ntotal:
            write_segment(index_dir, name, merged)
        crash_point("compact-segment-written")

        with write_transaction(db):  # waits (busy_timeout) for a commit in flight, never for a whole ingest
            db.executemany("DELETE FROM segments WHERE name = ?", [(n,) for n in inputs])
            if merged.ntotal:
                db.execute("INSERT INTO segments VALUES (?, ?, ?, ?)", (name, index_type(merged), int(merged.ntotal),
                                                                       _now()))
            db.executemany("DELETE FROM tombstones WHERE chunk_id = ?", ((int(id_),) for id_ in dropped))
            generation = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]) + 1
            db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(generation),))
            crash_point("compact-before-transaction-end")
        crash_point("compact-after-transaction-end")
        for old in inputs:  # readers hold loaded segments in memory; one mid-refresh re-reads the list
            (index_dir / SEGMENTS / f"{old}.faiss").unlink(missing_ok=True)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # best effort: readers in a transaction keep the WAL
        return CompactionInfo(generation, len(segments), len(segments) - len(inputs) + (1 if merged.ntotal else 0),
                              int(merged.ntotal), int(len(dropped)), index_type(merged),
                              time.perf_counter() - started)
    finally:
        db.close()
        lock.close()


# ------------------------------------------------------------------------------ converting the snapshot format
# An index of the snapshot format (CURRENT symlink + snapshots/, before segments) is converted in place, under the
# writer lock. The new database is built under a temporary name with its one segment, fsynced and renamed into
# place; only then are CURRENT and snapshots/ removed. A kill at any point leaves either the old format (converted
# again next time; the half-built files are removed) or the new one (the leftovers are removed).
OLD_POINTER, OLD_SNAPSHOTS = "CURRENT", "snapshots"
OLD_COLUMNS = "id, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash"


def convert_snapshot_format(index_dir: Path) -> bool:
    """Convert an old-format index at `index_dir` under the writer lock (for readers: `Index.open`)."""
    index_dir = Path(index_dir)
    if not (index_dir / OLD_POINTER).is_symlink() or (index_dir / DB_FILE).exists():
        return False
    lock = _lock(index_dir / LOCK_FILE, "writing to")
    try:
        return migrate_snapshot_format(index_dir)
    finally:
        lock.close()


def migrate_snapshot_format(index_dir: Path) -> bool:
    """Convert an old-format index; True when one was converted."""
    pointer = index_dir / OLD_POINTER
    if (index_dir / DB_FILE).exists():
        _remove_old_format(index_dir)  # a conversion killed after its rename
        return False
    if not pointer.is_symlink():
        return False
    snapshot = (index_dir / os.readlink(pointer)).resolve()
    manifest = json.loads((snapshot / "manifest.json").read_text())
    temp = index_dir / f"{DB_FILE}.migrating"
    temp.unlink(missing_ok=True)
    db = sqlite3.connect(temp, isolation_level=None)
    register_functions(db)
    try:
        ensure_schema(db)
        old = sqlite3.connect(f"file:{snapshot / 'chunks.sqlite'}?mode=ro", uri=True)
        has_context = "context" in {row[1] for row in old.execute("PRAGMA table_info(chunks)")}
        db.execute("BEGIN")
        db.executemany(INSERT_DOCUMENT,
                       old.execute("SELECT doc_id, source, content_hash, size, mtime_ns, chunking, chunk_count, "
                                   "ingested_at, 'default', '[]', '' FROM documents"))
        columns = OLD_COLUMNS + (", context" if has_context else ", ''") + ", 'default', ''"
        db.executemany(INSERT_CHUNK, old.execute(f"SELECT {columns} FROM chunks ORDER BY id"))
        next_id = (db.execute("SELECT MAX(id) FROM chunks").fetchone()[0] or 0) + 1
        old.close()
        vectors, ids = segment_contents(faiss.read_index(str(snapshot / "index.faiss")))
        index = build_segment_index(vectors, ids, int(manifest["dimension"]))
        meta = {"embedding_model": manifest["embedding_model"], "dimension": str(manifest["dimension"]),
                "chunking": json.dumps(manifest["chunking"], sort_keys=True), "format_version": str(FORMAT_VERSION),
                "next_chunk_id": str(next_id), "generation": "1", "committed_at": _now()}
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        if index.ntotal:
            name = new_segment_name("m")
            write_segment(index_dir, name, index)
            db.execute("INSERT INTO segments VALUES (?, ?, ?, ?)", (name, index_type(index), int(index.ntotal), _now()))
        db.execute("COMMIT")
    finally:
        db.close()
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    crash_point("migrate-before-rename")
    os.replace(temp, index_dir / DB_FILE)
    _fsync_dir(index_dir)
    _remove_old_format(index_dir)
    return True


def _remove_old_format(index_dir: Path) -> None:
    (index_dir / f"{DB_FILE}.migrating").unlink(missing_ok=True)
    pointer = index_dir / OLD_POINTER
    if pointer.is_symlink():
        pointer.unlink()
    shutil.rmtree(index_dir / OLD_SNAPSHOTS, ignore_errors=True)
    for leftover in index_dir.glob(f".{OLD_POINTER}.*"):
        leftover.unlink(missing_ok=True)
