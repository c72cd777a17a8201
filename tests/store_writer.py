"""Writes to a store with synthetic documents (no model needed); run as a subprocess by the crash tests.

    python -m tests.store_writer seed|commit|compact|open-for-writing INDEX_DIR

With RAG_TEST_CRASH_AT=<point> the store kills this process at that point of a commit, compaction or migration.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from rag.store import DocumentRecord, Store, compact
from rag.types import Chunk

MODEL, DIMENSION, CHUNKING = "test-model", 16, {"chunk_tokens": 10}
CHUNKS_PER_DOC = 3
SEEDED = range(0, 6)  # documents after `seed` (two commits, then doc 1 deleted)
SEED_DELETED = {1}
COMMIT_ADDS, COMMIT_DELETES = range(6, 9), {2}  # what `commit` changes


def vector(doc: int, ordinal: int) -> np.ndarray:
    seed = int(hashlib.sha256(f"{doc}:{ordinal}".encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
    return v / np.linalg.norm(v)


def doc_id(doc: int) -> str:
    return f"doc{doc:04d}"


def document(doc: int) -> tuple[DocumentRecord, list[Chunk], np.ndarray]:
    source = f"/docs/file{doc}.md"
    chunks = [Chunk(doc_id(doc), j, f"Passage {j} of file {doc} mentions zebra{doc} and common words.", source)
              for j in range(CHUNKS_PER_DOC)]
    record = DocumentRecord(doc_id(doc), source, f"hash{doc}", 1, 1, "{}", len(chunks), "2026-01-01T00:00:00")
    return record, chunks, np.stack([vector(doc, j) for j in range(CHUNKS_PER_DOC)])


def write(index_dir: Path, adds=(), deletes=()) -> None:
    store = Store.begin(index_dir, MODEL, DIMENSION, CHUNKING)
    for doc in adds:
        store.add_document(*document(doc))
    store.delete([doc_id(doc) for doc in deletes])
    store.commit()


def seed(index_dir: Path) -> None:
    write(index_dir, adds=range(0, 3))
    write(index_dir, adds=range(3, 6))
    write(index_dir, deletes=SEED_DELETED)


def main(action: str, index_dir: Path) -> None:
    if action == "seed":
        seed(index_dir)
    elif action == "commit":
        write(index_dir, adds=COMMIT_ADDS, deletes=COMMIT_DELETES)
    elif action == "compact":
        compact(index_dir)
    elif action == "open-for-writing":
        Store.begin(index_dir, MODEL, DIMENSION, CHUNKING).abort()
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
