"""Retrieval: dense and keyword search over one index (either store), fused by reciprocal rank."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rag.config import DEFAULT_RERANK_CANDIDATES, DEFAULT_SEARCH_RESULTS
from rag.embed import Embedder
from rag.store import Store
from rag.errors import UserError
from rag.rerank import Reranker
from rag.statements import statements_asked
from rag.store.terms import terms
from rag.types import LONG_DOCUMENT_CHUNKS, Chunk, RetrieverKind, ScoredChunk

# RRF's k: 60 is the constant of Cormack et al. (2009); it damps the weight of the very top ranks so that one
# retriever's first hit does not outvote agreement between both retrievers further down.
RRF_K = 60
# Candidates per leg before fusion: deep enough that the documents a question names are among them (the document
# ranking reorders only what the legs found). FinanceBench, 48 questions (bench/documents.py): document hit@1 0.75 at
# 30 candidates, 0.79 at 60.
HYBRID_CANDIDATES = 60
# How much a page's further chunks add to its score (`by_page`): 1 is a plain noisy-or, 0 the best chunk alone.
PAGE_SHARE = 1.0
# The best card match's vote, in first ranks' RRF shares (`Retriever._with_documents`). 2-3 lifted the tune half of
# financebench-dev (page hit@5 0.72 -> 0.84) and cost the report half (document hit@1 0.87 -> 0.83, page hit@1
# 0.39 -> 0.35; bench/evidence.py, session 22): one is kept. Gathering fused chunk scores per page (a page's further
# chunks adding 0.3-1.0 of their scores) cut the tune half's page hit@1 from 0.52 to 0.24-0.28.
DOCUMENT_VOTE = 1.0
STATEMENT_VOTE = 1.0  # of a first rank's RRF share (`with_statements`; 0.75 and 1.5 were worse on the tune half)
# The document ranking counts for long documents only (`LONG_DOCUMENT_CHUNKS`): a candidate at that position or later
# in its document shows it is one. A short document's passages carry its title themselves, and a second vote for it
# double-counts the title: on XQuAD (one-paragraph documents titled by their article) ranking every document by its
# card cut hybrid recall@1 from 0.937 to 0.842 ("Who sang the national anthem?" lifted "Doctor Who"); counted for long
# documents only, XQuAD and PubMedQA are unchanged (bench/retrieval.py).
# Okapi BM25's usual constants, for ranking the candidates' document cards.
BM25_K1, BM25_B = 1.2, 0.75
# The words of a question that can name a document: capitalised ones not opening a sentence, and any holding a
# figure ("Nike's", "Best Buy", "FY2019", "3M", "Q2"). A lower-case word ("client", "forced") is what a passage is
# about, which the two legs already match.
_NAMES = re.compile(r"(?<!^)(?<![.?!]\s)\b[A-Z][\w'&.-]*|\b\w*\d\w*")
_LETTERS_DIGITS = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")
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


def card_terms(text: str) -> list[str]:
    """A card's or query's terms, split where letters meet digits: names of periods and documents write them together
    ('FY2019', '2023Q2', '10-K') where questions and other documents do not ('fiscal 2019', 'Q2 of 2023')."""
    return terms(_LETTERS_DIGITS.sub(" ", text))


def score_documents(query: str, cards: dict[str, str]) -> dict[str, float]:
    """How well each document's card (title, issuer, period) matches the names in the query, relative to the best
    match (1.0), by Okapi BM25 over just these cards: a term every candidate's card holds ('10-K', 'Inc') weighs
    nothing; the issuer and year a question names weigh most. A card naming the issuer but not the year scores the
    issuer's share; the filings of one issuer for a question naming no year score the same. Documents whose card
    shares no term with the names are left out. (A handful of short cards per query: bm25s or rank_bm25 would cost
    more to import and set up than to score them here.)"""
    analysed = {doc_id: card_terms(card) for doc_id, card in cards.items() if card}
    if not analysed:
        return {}
    average = sum(map(len, analysed.values())) / len(analysed) or 1.0
    frequency = Counter(term for card in analysed.values() for term in set(card))
    query_terms = set(card_terms(" ".join(_NAMES.findall(query.strip()))))
    scores = {}
    for doc_id, card in analysed.items():
        counts = Counter(card)
        score = sum(math.log(1 + (len(analysed) - frequency[term] + 0.5) / (frequency[term] + 0.5))
                    * counts[term] * (BM25_K1 + 1)
                    / (counts[term] + BM25_K1 * (1 - BM25_B + BM25_B * len(card) / average))
                    for term in query_terms if counts[term])
        if score > 0:
            scores[doc_id] = score
    best = max(scores.values(), default=0.0)
    return {doc_id: round(score / best, 9) for doc_id, score in scores.items()}  # summation order must not split a tie


def one_per_page_first(ranked: list[tuple[int, float]], chunks: dict[int, Chunk]) -> list[tuple[int, float]]:
    """The best chunk of each page first, in rank order, then the further chunks of pages already in: five hits cite
    five pages where the candidates have them (a page's next chunk mostly continues the same table or paragraph).
    Chunks without a page (text formats) are never held back."""
    seen: set[tuple[str, int]] = set()
    first, further = [], []
    for id_, score in ranked:
        chunk = chunks.get(id_)
        page = (chunk.doc_id, chunk.page) if chunk is not None and chunk.page is not None else None
        (further if page in seen else first).append((id_, score))
        if page is not None:
            seen.add(page)
    return first + further


def with_statements(query: str, fused: list[tuple[int, float]], chunks: dict[int, Chunk]) -> list[tuple[int, float]]:
    """A vote for the chunks that are the financial statement the question names or asks a line item of ("using the
    cash flow statement", "capital expenditure"): the chunk's context names the statement its table is
    (`rag.statements`), worth a first rank in the fusion, so that among the filing's candidates the statement itself
    comes before passages that merely mention its figures (financebench-dev tune half, page hit@1: 0.24 without
    the vote, 0.52 with it; bench/evidence.py)."""
    asked = statements_asked(query)
    if not asked:
        return fused
    vote = STATEMENT_VOTE / (RRF_K + 1)
    rescored = [(id_, score + vote if id_ in chunks and asked & set(chunks[id_].context_fields) else score)
                for id_, score in fused]
    return sorted(rescored, key=lambda pair: (-pair[1], pair[0]))


def by_page(scored: list[tuple[int, float]], chunks: dict[int, Chunk]) -> list[tuple[int, float]]:
    """Reranked chunks ordered by their page's score, then their own: a page scores the probability that any of its
    chunks answers (noisy-or of the chunks' sigmoid relevance), so a page whose evidence is spread over several
    chunks (a statement's caption and its rows) can outrank a page with one slightly better chunk. Chunks without a
    page are a page of their own."""
    page_of = {id_: (chunks[id_].doc_id, chunks[id_].page) if chunks[id_].page is not None else (id_,)
               for id_, _ in scored}
    miss: dict[tuple, float] = {}
    for id_, score in sorted(scored, key=lambda pair: -pair[1]):
        page = page_of[id_]
        share = PAGE_SHARE if page in miss else 1.0  # the page's best chunk counts whole
        miss[page] = miss.get(page, 1.0) * (1 - share / (1 + math.exp(-score)))
    return sorted(scored, key=lambda pair: (miss[page_of[pair[0]]], -pair[1], pair[0]))


class Retriever:
    """Finds the chunks most relevant to a question.

    >>> retriever = Retriever(Store.open("rag-index"), Embedder())  # doctest: +SKIP
    >>> [hit.chunk.source for hit in retriever.retrieve("How do I set a timeout?", 3, collection="default")]
    ... # doctest: +SKIP
    """

    def __init__(self, store: Store, embedder: Embedder, kind: RetrieverKind | str = RetrieverKind.HYBRID,
                 candidates: int = HYBRID_CANDIDATES, reranker: Reranker | None = None,
                 rerank_candidates: int = DEFAULT_RERANK_CANDIDATES):
        self.store = store
        self.embedder = embedder
        embedder.follow(store.chunking.get("embedding_weights"))  # queries in the passages' weights
        self.kind = RetrieverKind.parse(kind)
        self.candidates = candidates  # per retriever, before fusion
        self.reranker = reranker  # None: hybrid order is final
        self.rerank_candidates = rerank_candidates
        self.rerank_seconds = 0.0  # total spent in the reranker, for benchmarks and metrics

    def retrieve(self, query: str, k: int, kind: RetrieverKind | str | None = None,
                 source: str | None = None, *, collection: str, rerank: bool = True) -> list[ScoredChunk]:
        """Top `k` chunks of one collection (every store query is scoped to it; `ALL_COLLECTIONS` only for
        maintenance code). `source` is a glob on the document path (e.g. '*.pdf' or 'docs/advanced/*'). Hybrid
        results are re-scored by the reranker when this retriever has one and `rerank` is not turned off."""
        if not query.strip():
            raise UserError("The query is empty.")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        kind = RetrieverKind.parse(kind or self.kind)
        allowed = self.store.ids_with_source(source, collection=collection) if source else None
        depth = max(k, self.candidates) if kind is RetrieverKind.HYBRID else k

        results: dict[str, list[tuple[int, float]]] = {}
        keyword = None
        if kind is RetrieverKind.HYBRID:
            keyword = _KEYWORD_LEGS.submit(self.store.lexical, query, depth, allowed, collection=collection)
        if kind in (RetrieverKind.DENSE, RetrieverKind.HYBRID):
            results["dense"] = self._dense(query, depth, allowed, collection)
        if kind is RetrieverKind.BM25:
            results["bm25"] = self.store.lexical(query, depth, allowed, collection=collection)
        elif keyword is not None:
            results["bm25"] = keyword.result()

        if kind is RetrieverKind.HYBRID:
            ranked = reciprocal_rank_fusion({name: [id_ for id_, _ in hits] for name, hits in results.items()})
            chunks = {chunk.id: chunk for chunk in self.store.get([id_ for id_, _ in ranked], collection=collection)}
            ranked = with_statements(query, self._with_documents(query, ranked, chunks), chunks)
            if rerank and self.reranker is not None:
                ranked = self._reranked(query, ranked, chunks)
            ranked = one_per_page_first(ranked, chunks)[:k]
        else:
            ranked = results[kind.value][:k]
            chunks = {chunk.id: chunk for chunk in self.store.get([id_ for id_, _ in ranked], collection=collection)}
        per_retriever = {name: dict(hits) for name, hits in results.items()}
        return [
            ScoredChunk(chunks[id_], score, rank, kind.value,
                        {name: scores[id_] for name, scores in per_retriever.items() if id_ in scores})
            for rank, (id_, score) in enumerate(ranked, 1) if id_ in chunks
        ]

    @staticmethod
    def _with_documents(query: str, fused: list[tuple[int, float]],
                        chunks: dict[int, Chunk]) -> list[tuple[int, float]]:
        """A third vote in the fusion, for long documents: each candidate also scores its document's card match
        (`score_documents`, 1.0 for the best) times 1 / (RRF_K + 1), what a first rank is worth. "What were Nike's
        FY2019 total current assets?" matches balance sheets in every filing; the card says which one is Nike's for
        fiscal 2019. By score, not rank: ranked, the second card (Nike's for fiscal 2021, which lacks the year) got
        1 / 62 against the first's 1 / 61, too little to tell the filings apart (FinanceBench hybrid document hit@1
        0.79 → 0.90 by score, bench/documents.py)."""
        candidates = [chunks[id_] for id_, _ in fused if id_ in chunks]
        long_documents = {chunk.doc_id for chunk in candidates if chunk.ordinal >= LONG_DOCUMENT_CHUNKS}
        cards = {chunk.doc_id: chunk.document_card for chunk in candidates if chunk.doc_id in long_documents}
        document_score = score_documents(query, cards)
        if not document_score:
            return fused
        rescored = [(id_, score + (DOCUMENT_VOTE * document_score[chunks[id_].doc_id] / (RRF_K + 1)
                                   if id_ in chunks and chunks[id_].doc_id in document_score else 0.0))
                    for id_, score in fused]
        return sorted(rescored, key=lambda pair: (-pair[1], pair[0]))

    def _reranked(self, query: str, fused: list[tuple[int, float]],
                  chunks: dict[int, Chunk]) -> list[tuple[int, float]]:
        """The first `rerank_candidates` of the fused order, in the reranker's order (it reads question and passage
        together), gathered by page; the rest follow in fused order."""
        head = [(id_, score) for id_, score in fused[:self.rerank_candidates] if id_ in chunks]
        started = time.perf_counter()
        scores = self.reranker.scores(query, [chunks[id_].indexed_text for id_, _ in head])
        self.rerank_seconds += time.perf_counter() - started
        return by_page([(id_, float(score)) for (id_, _), score in zip(head, scores)], chunks) \
            + fused[self.rerank_candidates:]

    def similarities(self, query: str, hits: list[ScoredChunk], *, collection: str) -> list[float]:
        """Cosine similarity of the query to each hit: the dense leg's score where it found the hit, else embedded
        now (a BM25-only hit, or the BM25 retriever)."""
        missing = [hit for hit in hits if "dense" not in hit.scores]
        computed = {}
        if missing:
            sizes = {doc_id: record.chunk_count for doc_id in {hit.chunk.doc_id for hit in missing}
                     if (record := self.store.document(doc_id, collection=collection)) is not None}
            vectors = self.embedder.encode_chunks([hit.chunk for hit in missing], sizes, at_query_time=True)
            query_vector = self.embedder.encode_query(query)
            computed = {id(hit): float(query_vector @ vector) for hit, vector in zip(missing, vectors)}
        return [hit.scores["dense"] if "dense" in hit.scores else computed[id(hit)] for hit in hits]

    def _dense(self, query: str, k: int, allowed: np.ndarray | None,
               collection: str) -> list[tuple[int, float]]:
        if allowed is not None and not len(allowed):
            return []
        return self.store.dense(self.embedder.encode_query(query), k, allowed, collection=collection)

    def as_langchain(self, collection: str, k: int = DEFAULT_SEARCH_RESULTS, kind: RetrieverKind | str | None = None):
        """This retriever as a LangChain `BaseRetriever` over one collection, for use inside LangChain chains."""
        from rag.langchain import LangChainRetriever

        return LangChainRetriever(retriever=self, collection=collection, k=k,
                                  kind=RetrieverKind.parse(kind or self.kind).value)
