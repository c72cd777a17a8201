"""Retrieval: dense and keyword search over one index (either store), fused by reciprocal rank."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rag.embed import Embedder
from rag.store import Store
from rag.errors import UserError
from rag.types import RetrieverKind, ScoredChunk

# RRF's k: 60 is the constant of Cormack et al. (2009); it damps the weight of the very top ranks so that one
# retriever's first hit does not outvote agreement between both retrievers further down.
RRF_K = 60
# A hybrid query runs its keyword leg on one of these threads while the calling thread embeds the query and searches
# the vectors: FAISS, ONNX Runtime and SQLite/libpq all release the GIL, so on 2 cores a hybrid query costs about
# its slower leg instead of the sum of both (bench/scale.py).
_KEYWORD_LEGS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="keyword-leg")


def reciprocal_rank_fusion(rankings: dict[str, list[int]], rrf_k: int = RRF_K) -> list[tuple[int, float]]:
    """Fused (id, score) best first; score = Σ over rankings of 1 / (rrf_k + rank), ranks from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings.values():
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))


class Retriever:
    """Finds the chunks most relevant to a question.

    >>> retriever = Retriever(Store.open("rag-index"), Embedder())  # doctest: +SKIP
    >>> [hit.chunk.source for hit in retriever.retrieve("How do I set a timeout?", k=3)]  # doctest: +SKIP
    """

    def __init__(self, store: Store, embedder: Embedder, kind: RetrieverKind | str = RetrieverKind.HYBRID,
                 candidates: int = 30):
        self.store = store
        self.embedder = embedder
        self.kind = RetrieverKind.parse(kind)
        self.candidates = candidates  # per retriever, before fusion

    def retrieve(self, query: str, k: int = 5, kind: RetrieverKind | str | None = None,
                 source: str | None = None, collection: str | None = None) -> list[ScoredChunk]:
        """Top `k` chunks. `source` is a glob on the document path (e.g. '*.pdf' or 'docs/advanced/*'); `collection`
        scopes every store query to one collection (None: the whole index)."""
        if not query.strip():
            raise UserError("The query is empty.")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        kind = RetrieverKind.parse(kind or self.kind)
        allowed = self.store.ids_with_source(source, collection) if source else None
        depth = max(k, self.candidates) if kind is RetrieverKind.HYBRID else k

        results: dict[str, list[tuple[int, float]]] = {}
        keyword = None
        if kind is RetrieverKind.HYBRID:
            keyword = _KEYWORD_LEGS.submit(self.store.lexical, query, depth, allowed, collection)
        if kind in (RetrieverKind.DENSE, RetrieverKind.HYBRID):
            results["dense"] = self._dense(query, depth, allowed, collection)
        if kind is RetrieverKind.BM25:
            results["bm25"] = self.store.lexical(query, depth, allowed, collection)
        elif keyword is not None:
            results["bm25"] = keyword.result()

        if kind is RetrieverKind.HYBRID:
            ranked = reciprocal_rank_fusion({name: [id_ for id_, _ in hits] for name, hits in results.items()})[:k]
        else:
            ranked = results[kind.value][:k]
        per_retriever = {name: dict(hits) for name, hits in results.items()}
        chunks = {chunk.id: chunk for chunk in self.store.get([id_ for id_, _ in ranked], collection)}
        return [
            ScoredChunk(chunks[id_], score, rank, kind.value,
                        {name: scores[id_] for name, scores in per_retriever.items() if id_ in scores})
            for rank, (id_, score) in enumerate(ranked, 1) if id_ in chunks
        ]

    def similarities(self, query: str, hits: list[ScoredChunk]) -> list[float]:
        """Cosine similarity of the query to each hit: the dense leg's score where it found the hit, else embedded
        now (a BM25-only hit, or the BM25 retriever)."""
        missing = [hit for hit in hits if "dense" not in hit.scores]
        computed = {}
        if missing:
            vectors = self.embedder.encode_queries([query] + [hit.chunk.indexed_text for hit in missing])
            computed = {id(hit): float(vectors[0] @ vector) for hit, vector in zip(missing, vectors[1:])}
        return [hit.scores["dense"] if "dense" in hit.scores else computed[id(hit)] for hit in hits]

    def _dense(self, query: str, k: int, allowed: np.ndarray | None,
               collection: str | None) -> list[tuple[int, float]]:
        if allowed is not None and not len(allowed):
            return []
        return self.store.dense(self.embedder.encode_query(query), k, allowed, collection)

    def as_langchain(self, k: int = 5, kind: RetrieverKind | str | None = None):
        """This retriever as a LangChain `BaseRetriever`, for use inside LangChain chains."""
        from rag.langchain import LangChainRetriever

        return LangChainRetriever(retriever=self, k=k, kind=RetrieverKind.parse(kind or self.kind).value)
