"""The PostgreSQL store: chunks, documents, vectors (pgvector HNSW) and full-text terms in one database.

Selected by `RAG_STORE_URL=postgresql://...`; the schema and its migrations are in `rag.store.pg_schema`. Unlike
the embedded store, any number of processes may write at once: a writer buffers its changes and applies them in
ONE transaction at `commit`, after taking a transaction-scoped advisory lock per document it touches, so two
writers of the same document run one after the other and the document is stored exactly once (the second one's
delete sees the first one's rows). Every commit bumps `meta.generation`, which is what `refresh` watches.

Scoping: `collection` (and `allowed` ids) go into every query's WHERE clause, never applied to results afterwards.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import astuple, fields
from pathlib import PurePath

import numpy as np
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb

from rag.config import Settings
from rag.store.base import (BufferedWriter, CommitInfo, CompactionInfo, DocumentRecord, IndexMismatchError,
                            IndexNotFoundError, Manifest, PendingChanges, StoreError)
from rag.store.pg_schema import (CREATE_VECTOR_INDEX, DOCUMENT_LOCK_NAMESPACE, MIGRATIONS, Database, initialise,
                                 read_meta, schema_version)
from rag.store.shared import (CHUNK_COLUMNS, DOCUMENT_COLUMNS, LEXICAL_POSTINGS_BUDGET, generation_name,
                              source_matches)
from rag.store.terms import indexed_terms, rarest_within, terms
from rag.types import ALL_COLLECTIONS, Chunk, collection_filter

INSERT_DOCUMENT = (f"INSERT INTO documents ({DOCUMENT_COLUMNS}) "
                   f"VALUES ({', '.join(['%s'] * len(fields(DocumentRecord)))})")
# New chunks arrive by binary COPY (no per-row statement, no text parsing of vectors on the server).
COPY_CHUNKS = ("COPY chunks (doc_id, collection, name, ordinal, text, source, page, page_end, heading, element_type,"
               " tokens, hash, context, embedding, terms, term_frequencies, term_count) FROM STDIN (FORMAT BINARY)")
COPY_CHUNK_TYPES = ["text", "text", "text", "int4", "text", "text", "int4", "int4", "text", "text", "int4", "text",
                    "text", "vector", "tsvector", "jsonb", "int4"]
# HNSW explores ef_search candidates per query (pgvector's default 40, at most 1000); a query for k hits needs at
# least k of them, and a margin keeps its recall near exact search's.
MIN_EF_SEARCH, MAX_EF_SEARCH = 100, 1000
# A commit adding at least this many chunks, and at least as many as the index holds, rebuilds the HNSW index
# after loading them instead of inserting each into it: CREATE INDEX built 20k 384-dim vectors ~9x faster than
# 20k inserts (25 s against 230 s on these shared cores). Its lock makes readers and writers wait for the commit.
BULK_REBUILD_MIN_CHUNKS = 10_000
BULK_REBUILD_MEMORY = "1GB"  # maintenance_work_mem for the build: the graph of ~500k 384-dim vectors fits in it
# A scoped query's HNSW scan goes on (pgvector 0.8's iterative scan, relaxed order) until k rows pass its WHERE or
# it has visited this many tuples: a 1% collection needs ~100 visits per hit. Past it (a scope of under ~0.1% of
# the table) the few rows found are completed by an exact scan of the scope, which is small then.
MAX_SCAN_TUPLES = 50_000
# BM25 as SQLite FTS5's bm25() computes it for the embedded store (its k1 and b, its IDF floor), so that both
# stores rank alike. Postgres's own ts_rank / ts_rank_cd know no document frequencies: on XQuAD they reached
# recall@1 0.887 (ts_rank, normalisation 1) and 0.803 (ts_rank_cd, 4) against 0.925 for FTS5's BM25.
BM25_K1, BM25_B, BM25_MIN_IDF = 1.2, 0.75, 1e-6
MAX_LEXEME_BYTES = 2046  # Postgres refuses longer lexemes (2 KiB); such "words" are blobs, not text
MAX_POSITIONS = 256  # positions a tsvector keeps per lexeme: BM25's term frequency saturates long before
LAST_POSITION = 16383  # a tsvector's largest position
# The rows holding a word (`w.word`), from the GIN index; a subquery's start, closed by the caller.
COUNT_POSTINGS = "SELECT count(*) FROM (SELECT FROM chunks WHERE terms @@ quote_literal(w.word)::tsquery"


def _analysed(chunk: Chunk) -> tuple[bytes, Jsonb, int]:
    """The chunk's analysed terms (those FTS5 indexes in the embedded store) as a tsvector in PostgreSQL's binary
    form, each term a lexeme as it is (no parser or dictionary of Postgres in between) with its positions; each
    term's frequency (BM25's tf); and how many there are."""
    words = [word for word in indexed_terms(chunk.context, chunk.text).split()
             if len(word.encode()) <= MAX_LEXEME_BYTES]
    frequencies: dict[str, int] = {}
    for word in words:
        frequencies[word] = frequencies.get(word, 0) + 1
    positions: dict[bytes, list[int]] = {}
    for position, word in enumerate(words, 1):
        places = positions.setdefault(word.encode(), [])
        if len(places) < MAX_POSITIONS and (not places or places[-1] < LAST_POSITION):  # increasing, as required
            places.append(min(position, LAST_POSITION))
    # tsvectorrecv's input: the lexeme count, then each lexeme NUL-terminated with its position count and positions
    # (weight bits 0), the lexemes in the server's order (bytewise) so it need not sort them.
    parts = [struct.pack("!i", len(positions))]
    for lexeme in sorted(positions):
        parts += [lexeme, struct.pack(f"!xH{len(positions[lexeme])}H", len(positions[lexeme]), *positions[lexeme])]
    return b"".join(parts), Jsonb(frequencies), len(words)


class _TsVectorDumper(Dumper):
    """Sends `_analysed`'s bytes as they are where a binary COPY expects a tsvector (looked up by type oid only)."""

    format = Format.BINARY
    oid = 3614  # tsvector: a built-in type, the same oid in every PostgreSQL

    def dump(self, obj: bytes) -> bytes:
        return obj


def approximate_search_settings(conn, k: int) -> None:
    """HNSW's search settings for a query of k hits, for the rest of the current transaction."""
    conn.execute(f"SET LOCAL hnsw.ef_search = {min(MAX_EF_SEARCH, max(MIN_EF_SEARCH, 2 * k))}")
    conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
    conn.execute(f"SET LOCAL hnsw.max_scan_tuples = {MAX_SCAN_TUPLES}")


def dense_query(where: str) -> str:
    """A dense search's SQL (parameters: the query vector, `where`'s, k); (id, inner product) rows best first.
    The inner query may take the HNSW index (relaxed order: roughly by distance); MATERIALIZED keeps the outer
    ORDER BY (`+ 0`: not taken for the inner one's) an exact sort of the hits by their exact distances."""
    return (f"WITH hits AS MATERIALIZED (SELECT id, embedding <#> %b AS distance FROM chunks {where} "
            "ORDER BY distance LIMIT %s) SELECT id, -distance FROM hits ORDER BY distance + 0, id")


def _chunk(row: tuple) -> Chunk:
    id_, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash_, context, name, page_end = row
    return Chunk(doc_id, ordinal, text, source, page, heading, element_type, tokens, hash_, id_, context,
                 name or PurePath(source).name, page_end)


def _document(row: tuple) -> DocumentRecord:
    *rest, warnings, name = row  # jsonb arrives as a list
    return DocumentRecord(*rest, tuple(warnings), name)


def _document_row(record: DocumentRecord) -> tuple:
    *rest, warnings, name = astuple(record)
    return (*rest, Jsonb(list(warnings)), name)


def _where(collection: str, allowed: np.ndarray | None = None) -> tuple[str, list]:
    """The WHERE clause (and its parameters) that scopes a chunk query to a collection and/or a set of ids."""
    clauses, params, collection = [], [], collection_filter(collection)
    if collection is not None:
        clauses.append("collection = %s")
        params.append(collection)
    if allowed is not None:
        clauses.append("id = ANY(%s)")
        params.append([int(id_) for id_ in allowed])  # a list: a numpy array would be sent as a vector
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def check_compatible(meta: dict, label: str, embedding_model: str | None, dimension: int | None) -> None:
    model, dims = meta["embedding_model"], meta["dimension"]
    if (embedding_model and embedding_model != model) or (dimension and dimension != dims):
        raise IndexMismatchError(
            f"The index in the database at {label} was built with embedding model '{model}' ({dims} dims), but the "
            f"configured model is '{embedding_model}' ({dimension} dims). Its vectors are not comparable: configure "
            "the same model, or use another database.")


class PostgresStore(BufferedWriter):
    """An index in a PostgreSQL database: read it with `open`, change it with `begin` ... `commit`.

    >>> store = PostgresStore.open("postgresql://rag@db/rag", settings=settings)  # doctest: +SKIP
    >>> store.dense(query_vector, k=3, collection="default")  # doctest: +SKIP
    """

    def __init__(self, database: Database, writer_config: tuple[str, int, dict] | None = None):
        self._db = database
        self._closed = False
        self.location = database.label  # what messages and `rag index stats` show (no password)
        self._writer_config = writer_config
        self._generation = self._meta()["generation"] if writer_config is None else 0
        self._pending = PendingChanges()  # a writer's changes until commit

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, location: str, embedding_model: str | None = None, dimension: int | None = None, *,
             settings: Settings | None = None) -> "PostgresStore":
        """A reader; with a model name/dimension, refuse an index built otherwise. `settings` gives the pool size
        and timeouts (`db_pool_size`, `db_timeout_s`; their defaults without it)."""
        database = Database.from_settings(location, settings)
        try:
            with database.connection() as conn:
                meta = read_meta(conn)
            if meta is None or meta["generation"] == 0:  # a writer began but never committed, as in the embedded
                raise IndexNotFoundError(f"No index in the database at {database.label} yet. Build one with "
                                         "`rag ingest PATH` (RAG_STORE_URL set) or upload documents.")
            check_compatible(meta, database.label, embedding_model, dimension)
            return cls(database)
        except BaseException:
            database.close()
            raise

    @classmethod
    def begin(cls, location: str, embedding_model: str, dimension: int, chunking: dict, *,
              settings: Settings | None = None) -> "PostgresStore":
        """A writer (creating the index if needed). Other writers may run at once; changes are buffered until
        `commit`."""
        database = Database.from_settings(location, settings)
        try:
            with database.connection() as conn:
                meta = initialise(conn, embedding_model, dimension, chunking)
            if meta is not None:
                check_compatible(meta, database.label, embedding_model, dimension)
            return cls(database, (embedding_model, dimension, chunking))
        except BaseException:
            database.close()
            raise

    # ---------------------------------------------------------------- reading
    def _meta(self) -> dict:
        with self._db.connection() as conn:
            meta = read_meta(conn)
        if meta is None:
            raise IndexNotFoundError(f"No index in the database at {self.location}.")
        return meta

    @property
    def chunking(self) -> dict:
        """How the index's documents were last chunked and embedded: one row read, no counting."""
        return self._meta()["chunking"]

    @property
    def manifest(self) -> Manifest:
        meta = self._meta()  # a writer's `begin` created it
        return Manifest(embedding_model=meta["embedding_model"], dimension=meta["dimension"],
                        chunking=meta["chunking"], index_type="hnsw(vector_ip_ops)",
                        **self.counts(collection=ALL_COLLECTIONS), segments=0,
                        tombstones=0, generation=meta["generation"], created_at=meta["committed_at"],
                        snapshot=generation_name(meta["generation"]), format_version=len(MIGRATIONS))

    def refresh(self) -> bool:
        """True when a commit (by any process) became visible since the last call. One indexed row read."""
        generation = self._meta()["generation"]
        changed, self._generation = generation != self._generation, generation
        return changed

    def dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
              collection: str) -> list[tuple[int, float]]:
        """(chunk id, inner product) best first, from the HNSW index, scoped or not: an iterative scan returns
        rows that pass the scope in roughly increasing distance, re-ordered here by their exact distances. The
        planner may prefer an exact scan for a small scope (its estimate; then the results are exact)."""
        if k <= 0 or (allowed is not None and not len(allowed)):
            return []
        where, params = _where(collection, allowed)
        query = np.asarray(vector, dtype=np.float32).ravel()
        with self._db.connection() as conn, conn.transaction():
            approximate_search_settings(conn, k)
            rows = conn.execute(dense_query(where), [query, *params, k]).fetchall()
            if len(rows) < k:  # the scan stopped at MAX_SCAN_TUPLES, or the scope holds fewer than k rows
                rows = conn.execute(f"WITH scored AS MATERIALIZED (SELECT id, -(embedding <#> %b) AS score "
                                    f"FROM chunks {where}) SELECT id, score FROM scored ORDER BY score DESC, id "
                                    "LIMIT %s", [query, *params, k]).fetchall()
        return [(int(id_), float(score)) for id_, score in rows]

    def lexical(self, query: str, k: int, allowed: np.ndarray | None = None, *,
                collection: str) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) best first; chunks sharing no term with the query are left out. Scored as FTS5
        scores the embedded store's chunks: the same analysed terms, formula and statistics of the whole index (a
        collection changes which chunks come back, not how they rank), and the same cut to the query's rarest
        terms within LEXICAL_POSTINGS_BUDGET postings."""
        words = list(dict.fromkeys(word for word in terms(query) if len(word.encode()) <= MAX_LEXEME_BYTES))
        if not words or k <= 0 or (allowed is not None and not len(allowed)):
            return []
        where, params = _where(collection, allowed)
        with self._db.connection() as conn:
            # Each word's document frequency (a GIN lookup, then a visit of each posting's row) counted up to just
            # over the budget, past which a word is dropped; and the index's totals; in one statement.
            rows = conn.execute(
                f"SELECT word, ({COUNT_POSTINGS} LIMIT {LEXICAL_POSTINGS_BUDGET + 1}) AS postings), meta.chunks,"
                " meta.terms FROM unnest(%s::text[]) AS w (word), meta", [words]).fetchall()
            if not rows or not rows[0][2]:
                return []
            frequency = {word: df for word, df, _, _ in rows}
            total, length = rows[0][2], rows[0][3] / rows[0][2]
            kept = [word for word in rarest_within(words, frequency, LEXICAL_POSTINGS_BUDGET) if frequency[word]]
            if not kept:
                return []
            if frequency[kept[0]] > LEXICAL_POSTINGS_BUDGET:  # every word is common: the rarest is kept, counted
                frequency[kept[0]] = conn.execute(f"SELECT ({COUNT_POSTINGS}) AS postings) FROM "
                                                  "(SELECT %s::text AS word) AS w", [kept[0]]).fetchone()[0]
            idf = [max(math.log((total - frequency[word] + 0.5) / (frequency[word] + 0.5)), BM25_MIN_IDF)
                   for word in kept]
            # Each matching row's term frequencies are looked up by word in its jsonb, in one subquery per row
            # (unnesting its whole tsvector cost ~0.1 ms a row, most of the query's time).
            rows = conn.execute(
                f"SELECT c.id, (SELECT sum(w.idf * w.tf * {BM25_K1 + 1} / (w.tf + {BM25_K1} * ({1 - BM25_B} + "
                f"{BM25_B} * c.term_count / %s))) FROM (SELECT idf, (c.term_frequencies ->> word)::float8 AS tf "
                "FROM unnest(%s::text[], %s::float8[]) AS w (word, idf)) AS w) AS score FROM chunks AS c "
                f"{where + ' AND' if where else 'WHERE'} c.terms @@ %s::tsquery ORDER BY score DESC, c.id LIMIT %s",
                [length, kept, idf, *params, " | ".join(f"'{word}'" for word in kept), k]).fetchall()
        return [(int(id_), float(score)) for id_, score in rows]

    def search(self, vector: np.ndarray, k: int, *, collection: str) -> list[tuple[Chunk, float]]:
        hits = self.dense(vector, k, collection=collection)
        chunks = {chunk.id: chunk for chunk in self.get([id_ for id_, _ in hits], collection=collection)}
        return [(chunks[id_], score) for id_, score in hits if id_ in chunks]

    def get(self, ids: Iterable[int], *, collection: str) -> list[Chunk]:
        """The chunks with these ids, in the order asked; ids outside `collection` (or deleted) are dropped."""
        ids = [int(id_) for id_ in ids]
        if not ids:
            return []
        where, params = _where(collection, ids)
        with self._db.connection() as conn:
            by_id = {row[0]: _chunk(row) for row in conn.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks {where}",
                                                                 params)}
        return [by_id[id_] for id_ in ids if id_ in by_id]

    def iter_chunks(self, *, collection: str) -> Iterator[Chunk]:
        where, params = _where(collection)
        with self._db.connection() as conn, conn.transaction():
            with conn.cursor(name="rag_iter_chunks") as cursor:  # server-side: streamed, not loaded at once
                cursor.itersize = 2000
                cursor.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks {where} ORDER BY id", params)
                for row in cursor:
                    yield _chunk(row)

    def ids_with_source(self, pattern: str, *, collection: str) -> np.ndarray:
        """Ids of the chunks whose source path matches a glob (or ends with it below some folder)."""
        where, params = _where(collection)
        with self._db.connection() as conn:
            doc_ids = [doc_id for doc_id, source in conn.execute(f"SELECT doc_id, source FROM documents {where}",
                                                                 params) if source_matches(source, pattern)]
            rows = conn.execute("SELECT id FROM chunks WHERE doc_id = ANY(%s) ORDER BY id", [doc_ids]).fetchall()
        return np.asarray([id_ for (id_,) in rows], dtype=np.int64)

    def documents(self, *, collection: str) -> dict[str, DocumentRecord]:
        """Documents by doc_id."""
        where, params = _where(collection)
        with self._db.connection() as conn:
            rows = conn.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents {where}", params).fetchall()
        return {row[0]: _document(row) for row in rows}

    def document(self, doc_id: str, *, collection: str) -> DocumentRecord | None:
        where, params = _where(collection)
        with self._db.connection() as conn:
            row = conn.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents {where + ' AND' if where else 'WHERE'} "
                               "doc_id = %s", [*params, doc_id]).fetchone()
        return _document(row) if row else None

    def counts(self, *, collection: str) -> dict[str, int]:
        """One statement, so the numbers describe one committed state. Every chunk row holds its vector."""
        where, params = _where(collection)
        with self._db.connection() as conn:
            documents, chunks = conn.execute(f"SELECT (SELECT count(*) FROM documents {where}), "
                                             f"(SELECT count(*) FROM chunks {where})", params * 2).fetchone()
        return {"documents": documents, "chunks": chunks, "vectors": chunks}

    def collections(self) -> dict[str, int]:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT collection, count(*) FROM documents GROUP BY collection ORDER BY 1")
            return {name: count for name, count in rows}

    def stats(self) -> dict:
        """What `rag index stats` shows for this backend: where the index is (`path`, as the embedded store says it:
        host:port/database here), the versions and the sizes on disk."""
        with self._db.connection() as conn:
            server, pgvector, size, chunk_bytes, vector_bytes, dead = conn.execute(
                "SELECT current_setting('server_version'), "
                "(SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                "pg_database_size(current_database()), pg_total_relation_size('chunks'), "
                "COALESCE(pg_relation_size(to_regclass('chunks_embedding')), 0), "
                "(SELECT COALESCE(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = 'chunks')").fetchone()
            version = schema_version(conn)
        return {"backend": "postgres", "path": self.location, "server_version": server, "pgvector": pgvector,
                "schema_version": version, "database_bytes": size, "chunks_bytes": chunk_bytes,
                "hnsw_index_bytes": vector_bytes, "dead_chunk_rows": dead}

    def compact(self, full: bool = True, max_segments: int = 8,
                tombstone_ratio: float = 0.2) -> CompactionInfo | None:
        """`VACUUM (ANALYZE)` of the index tables: reclaims deleted rows (and their HNSW and GIN entries) and
        refreshes the planner's statistics. Not `full` and dead rows under `tombstone_ratio` of the live ones:
        None (nothing to do). `max_segments` has no meaning here (no segments). Never blocks readers or writers."""
        started = time.perf_counter()
        with self._db.connection() as conn:
            live, dead = conn.execute("SELECT COALESCE(n_live_tup, 0), COALESCE(n_dead_tup, 0) "
                                      "FROM pg_stat_user_tables WHERE relname = 'chunks'").fetchone() or (0, 0)
            if not full and dead <= tombstone_ratio * max(live, 1):
                return None
            conn.execute("VACUUM (ANALYZE) documents, chunks")
            vectors = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
            generation = read_meta(conn)["generation"]
        return CompactionInfo(generation, 0, 0, vectors, dead, "hnsw(vector_ip_ops)", time.perf_counter() - started)

    # ---------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if self._writer_config is None:
            raise StoreError("This store was opened read-only; use PostgresStore.begin() to change the index.")

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents with their chunks (at commit); returns the number of chunks removed."""
        self._require_writable()
        doc_ids = list(doc_ids)
        removed = self._pending.delete(doc_ids)
        with self._db.connection() as conn:
            removed += conn.execute("SELECT count(*) FROM chunks WHERE doc_id = ANY(%s)", (doc_ids,)).fetchone()[0]
        return removed

    def commit(self) -> CommitInfo:
        """Apply every buffered change in one transaction, holding each touched document's advisory lock."""
        self._require_writable()
        started = time.perf_counter()
        _, _, chunking = self._writer_config
        pending = self._pending
        documents = sorted(pending.deletes | pending.touches.keys() | pending.adds.keys())
        deletes = sorted(pending.deletes)
        chunk_rows = [(record.doc_id, record.collection, record.name, chunk.ordinal, chunk.text, chunk.source,
                       chunk.page, chunk.page_end, chunk.heading, chunk.element_type, chunk.tokens, chunk.hash,
                       chunk.context, vector, *_analysed(chunk))
                      for record, chunks, vectors in pending.adds.values() for chunk, vector in zip(chunks, vectors)]
        with self._db.connection() as conn, conn.transaction():
            # In a fixed order, so two writers sharing documents cannot deadlock.
            conn.execute("SELECT pg_advisory_xact_lock(%s, key) FROM (SELECT DISTINCT hashtext(doc_id) AS key "
                         "FROM unnest(%s::text[]) AS doc_id ORDER BY 1) AS keys",
                         (DOCUMENT_LOCK_NAMESPACE, documents))
            deleted, deleted_terms = conn.execute(
                "WITH gone AS (DELETE FROM chunks WHERE doc_id = ANY(%s) RETURNING term_count) "
                "SELECT count(*), COALESCE(sum(term_count), 0) FROM gone", (deletes,)).fetchone()
            conn.execute("DELETE FROM documents WHERE doc_id = ANY(%s)", (deletes,))
            (indexed,) = conn.execute("SELECT chunks FROM meta").fetchone()
            rebuild = len(chunk_rows) >= max(BULK_REBUILD_MIN_CHUNKS, indexed)
            if rebuild:
                conn.execute("DROP INDEX chunks_embedding")
            with conn.cursor() as cursor:
                cursor.executemany(INSERT_DOCUMENT, [_document_row(record) for record, _, _ in pending.adds.values()])
                cursor.adapters.register_dumper(None, _TsVectorDumper)
                with cursor.copy(COPY_CHUNKS) as copy:
                    copy.set_types(COPY_CHUNK_TYPES)
                    for row in chunk_rows:
                        copy.write_row(row)
                cursor.executemany("UPDATE documents SET size = %s, mtime_ns = %s WHERE doc_id = %s",
                                   [(size, mtime, doc_id) for doc_id, (size, mtime) in pending.touches.items()])
            if rebuild:
                conn.execute(f"SET LOCAL maintenance_work_mem = '{BULK_REBUILD_MEMORY}'")
                conn.execute(CREATE_VECTOR_INDEX)
            # Last: the meta row's lock serialises the writers only for the rest of their transactions.
            generation = conn.execute(
                "UPDATE meta SET generation = generation + 1, committed_at = now(), chunking = %s, "
                "chunks = chunks + %s, terms = terms + %s RETURNING generation",
                (json.dumps(chunking, sort_keys=True), len(chunk_rows) - deleted,
                 sum(row[-1] for row in chunk_rows) - deleted_terms)).fetchone()[0]
        self._pending = PendingChanges()
        self._writer_config = None  # like the embedded writer: one commit, then read-only
        return CommitInfo(generation, generation_name(generation), len(chunk_rows), deleted,
                          time.perf_counter() - started)

    def abort(self) -> None:
        """Drop the buffered changes; the index stays as it was."""
        self._pending = PendingChanges()
        self._writer_config = None

    def close(self) -> None:
        """Idempotent: the pool is shared (counted per user) and must be released once."""
        self.abort()
        if not self._closed:
            self._closed = True
            self._db.close()
