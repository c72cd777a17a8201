"""The embedded store: SQLite (rows, full-text index, segment list, tombstones) + immutable FAISS segment files.

The store class is here; its database in `rag.store.sqlite_schema`, its segment files and compaction in
`rag.store.segments`, the conversion of the older snapshot format in `rag.store.snapshot_format`. The crash-safety
argument below covers all of them.

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

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from rag.store.base import (BufferedWriter, CommitInfo, CompactionInfo, DocumentRecord, IndexMismatchError,
                            IndexNotFoundError, Manifest, PendingChanges, StoreError)
from rag.store.segments import (SEGMENTS, build_segment_index, compact, index_type, new_segment_name, read_segment,
                                remove_orphan_segments, search_parameters, write_segment)
from rag.store.shared import (CHUNK_COLUMNS, DOCUMENT_COLUMNS, LEXICAL_POSTINGS_BUDGET, crash_point, generation_name,
                              source_matches, utc_now)
from rag.store.snapshot_format import migrate_snapshot_format
from rag.store.sqlite_schema import (DB_FILE, FORMAT_VERSION, INSERT_CHUNK, INSERT_DOCUMENT, LOCK_FILE,
                                     check_compatible, collection_condition, connect, document_from_row, document_row,
                                     ensure_schema, outdated, row_to_chunk, take_lock, upgrade, write_transaction)
from rag.store.terms import match_query, rarest_within, terms
from rag.types import ALL_COLLECTIONS, Chunk, collection_filter


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

class EmbeddedStore(BufferedWriter):
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
        lock_handle = take_lock(index_dir / LOCK_FILE, "writing to")
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
        scope, scope_args = collection_condition(collection)
        by_id = {}
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            rows = self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE id IN ({','.join('?' * len(batch))})"
                                   f"{scope}", (*batch, *scope_args))
            by_id.update((row[0], row_to_chunk(row)) for row in rows)
        return [by_id[id_] for id_ in ids if id_ in by_id]

    def iter_chunks(self, *, collection: str) -> Iterator[Chunk]:
        scope, scope_args = collection_condition(collection, first=True)
        for row in self.db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks{scope} ORDER BY id", scope_args):
            yield row_to_chunk(row)

    def ids_with_source(self, pattern: str, *, collection: str) -> np.ndarray:
        """Ids of the chunks whose source path matches a glob (or ends with it below some folder)."""
        scope, scope_args = collection_condition(collection, first=True)
        doc_ids = [doc_id for doc_id, source in self.db.execute(f"SELECT doc_id, source FROM documents{scope}",
                                                                 scope_args)
                   if source_matches(source, pattern)]
        ids: list[int] = []
        for start in range(0, len(doc_ids), 500):
            batch = doc_ids[start:start + 500]
            ids += [row[0] for row in self.db.execute(
                f"SELECT id FROM chunks WHERE doc_id IN ({','.join('?' * len(batch))})", batch)]
        return np.asarray(ids, dtype=np.int64)

    def documents(self, *, collection: str) -> dict[str, DocumentRecord]:
        """Documents by doc_id."""
        scope, scope_args = collection_condition(collection, first=True)
        rows = self.db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents{scope}", scope_args)
        return {row[0]: document_from_row(row) for row in rows}

    def document(self, doc_id: str, *, collection: str) -> DocumentRecord | None:
        scope, scope_args = collection_condition(collection)
        row = self.db.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE doc_id = ?{scope}",
                              (doc_id, *scope_args)).fetchone()
        return document_from_row(row) if row else None

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
            db.executemany(INSERT_DOCUMENT, (document_row(record) for record in added_docs.values()))
            db.executemany(INSERT_CHUNK, (
                (int(id_), record.doc_id, chunk.ordinal, chunk.text, chunk.source, chunk.page, chunk.heading,
                 chunk.element_type, chunk.tokens, chunk.hash, chunk.context, record.collection, record.name,
                 chunk.page_end)
                for id_, (record, chunk) in zip(ids, new_chunks)))
            db.executemany("UPDATE documents SET size = ?, mtime_ns = ? WHERE doc_id = ?",
                           ((size, mtime, doc_id) for doc_id, (size, mtime) in self._pending.touches.items()))
            if segment:
                db.execute("INSERT INTO segments VALUES (?, ?, ?, ?)", (*segment, utc_now()))
            generation = self.generation + 1
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("embedding_model", model), ("dimension", str(dimension)),
                ("chunking", json.dumps(chunking, sort_keys=True)), ("format_version", str(FORMAT_VERSION)),
                ("next_chunk_id", str(next_id + len(new_chunks))), ("generation", str(generation)),
                ("committed_at", utc_now())])
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

