"""BM25 keyword index over the chunks of a snapshot, saved as .npy arrays + JSON by bm25s (no pickle)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import bm25s
import numpy as np

IDS_FILE = "chunk_ids.json"


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased, English stopwords removed, Snowball-stemmed ('timeouts' matches 'timeout')."""
    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)


class LexicalIndex:
    """BM25 over chunk texts; positions in the bm25s index map to chunk ids through `chunk_ids`."""

    def __init__(self, bm25: bm25s.BM25 | None, chunk_ids: np.ndarray):
        self.bm25 = bm25
        self.chunk_ids = chunk_ids

    @classmethod
    def build(cls, chunk_ids: list[int], texts: list[str]) -> "LexicalIndex":
        if not texts:
            return cls(None, np.zeros(0, dtype=np.int64))
        bm25 = bm25s.BM25()
        bm25.index(tokenize(texts), show_progress=False)
        return cls(bm25, np.asarray(chunk_ids, dtype=np.int64))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self.bm25 is not None:
            self.bm25.save(str(directory), show_progress=False)
        (directory / IDS_FILE).write_text(json.dumps(self.chunk_ids.tolist()))

    @classmethod
    def load(cls, directory: Path) -> "LexicalIndex":
        chunk_ids = np.asarray(json.loads((directory / IDS_FILE).read_text()), dtype=np.int64)
        bm25 = bm25s.BM25.load(str(directory), show_progress=False) if len(chunk_ids) else None
        return cls(bm25, chunk_ids)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) best first; chunks sharing no term with the query are left out."""
        if self.bm25 is None or k <= 0:
            return []
        documents, scores = self.bm25.retrieve(tokenize([query]), k=min(k, len(self.chunk_ids)), show_progress=False)
        return [(int(self.chunk_ids[position]), float(score))
                for position, score in zip(documents[0], scores[0]) if score > 0]
