"""The embedded store's vectors: immutable FAISS segment files (`<index>/segments/<name>.faiss`), how one is built,
written, read and searched, and compaction, which merges segments into one.

A segment file is written whole under a temporary name and renamed; it counts once the database registers it (see
`rag.store.embedded`), so a file no commit registered is an orphan that the next writer removes.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
import uuid
from pathlib import Path

import faiss
import numpy as np

from rag.store.base import CompactionInfo, IndexBusyError
from rag.store.shared import crash_point, utc_now
from rag.store.sqlite_schema import COMPACT_LOCK_FILE, connect, fsync_dir, take_lock, write_transaction

SEGMENTS = "segments"
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
    fsync_dir(folder)
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


def remove_orphan_segments(index_dir: Path, db: sqlite3.Connection) -> None:
    """Segment files no commit registered (a writer or compactor killed before its transaction). Writer lock held;
    skipped while a compaction runs, since its new segment is unregistered until its swap."""
    folder = index_dir / SEGMENTS
    if not folder.exists():
        return
    try:
        compact_lock = take_lock(index_dir / COMPACT_LOCK_FILE, "compacting")
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

    `full` merges every segment (and retrains the IVF of a large result). Otherwise: all segments when tombstones
    exceed `tombstone_ratio` of the stored vectors, else the small segments (all but the largest) once there are
    more than `max_segments`. A result of ANN_THRESHOLD vectors or more gets an IVF index (retrained on its
    vectors). Readers and a concurrent writer are never blocked: the new segment is built from the inputs as they
    were when it started and swapped in by one short transaction.
    """
    index_dir = Path(index_dir)
    started = time.perf_counter()
    lock = take_lock(index_dir / COMPACT_LOCK_FILE, "compacting")
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
                                                                       utc_now()))
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

