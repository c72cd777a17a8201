"""Hybrid retrieval over the shipped corpus: fusion, filters, keyword queries, the LangChain adapter."""

import shutil
from pathlib import Path

import pytest

import rag.store.segments
from ingest.job import IngestJob
from rag.retrieve import (Retriever, RetrieverKind, with_statements, by_page, one_per_page_first,
                          reciprocal_rank_fusion, score_documents)
from rag.store import Store
from rag.types import ALL_COLLECTIONS, DEFAULT_COLLECTION, LONG_DOCUMENT_CHUNKS, Chunk
from tests.conftest import CORPUS, COSINE_TOLERANCE

# Queries dominated by identifiers, where exact terms matter more than meaning; each with the file that holds it.
KEYWORD_QUERIES = [
    ("SSL_CERT_FILE", "environment_variables.md"),
    ("MockTransport handler", "transports.md"),
    ("WSGITransport", "transports.md"),
    ("max_keepalive_connections", "resource-limits.md"),
    ("socks5 proxy", "proxies.md"),
    ("RemoteProtocolError", "exceptions.md"),
    ("PoolTimeout", "exceptions.md"),
    ("NetRCAuth", "authentication.md"),
    ("event_hooks response", "event-hooks.md"),
    ("trust_env", "environment_variables.md"),
]


@pytest.fixture(scope="module")
def httpx_index(tmp_path_factory, embedder):
    from rag.config import Settings

    index = tmp_path_factory.mktemp("httpx") / "index"
    IngestJob(Settings(index_dir=index, parse_workers=2), embedder).run(CORPUS / "httpx")
    return index


@pytest.fixture(scope="module")
def retriever(httpx_index, embedder):
    return Retriever(Store.open(httpx_index, embedder.name), embedder)


def _mrr(retriever, kind, k=5):
    total = 0.0
    for query, expected in KEYWORD_QUERIES:
        hits = retriever.retrieve(query, k, kind, collection=DEFAULT_COLLECTION)
        total += next((1 / hit.rank for hit in hits if hit.chunk.source.endswith(expected)), 0.0)
    return total / len(KEYWORD_QUERIES)


def test_hybrid_beats_or_equals_dense_on_keyword_queries(retriever):
    dense, bm25, hybrid = (_mrr(retriever, kind) for kind in RetrieverKind)
    assert hybrid >= dense
    assert hybrid > 0.7, (dense, bm25, hybrid)


def test_hits_carry_score_rank_and_retriever(retriever):
    hits = retriever.retrieve("How do I set a timeout on a client?", 4, "hybrid", collection=DEFAULT_COLLECTION)
    assert [hit.rank for hit in hits] == [1, 2, 3, 4]
    assert all(hit.retriever == "hybrid" and hit.scores for hit in hits)
    assert hits[0].score >= hits[-1].score
    assert hits[0].chunk.source.endswith("timeouts.md")
    dense = retriever.retrieve("How do I set a timeout on a client?", 2, "dense", collection=DEFAULT_COLLECTION)
    assert all(set(hit.scores) == {"dense"} and hit.retriever == "dense" for hit in dense)


def test_source_glob_filter_restricts_every_retriever(retriever):
    for kind in RetrieverKind:
        hits = retriever.retrieve("client timeout", 5, kind, source="advanced/*", collection=DEFAULT_COLLECTION)
        assert hits and all("/advanced/" in hit.chunk.source for hit in hits)
    assert retriever.retrieve("client", 5, "hybrid", source="*.nothing", collection=DEFAULT_COLLECTION) == []


def test_unknown_retriever_and_bad_k_are_clear_errors(retriever):
    with pytest.raises(ValueError, match=r"Unknown retriever 'fuzzy'. Supported: \['dense', 'bm25', 'hybrid'\]"):
        retriever.retrieve("x", 3, "fuzzy", collection=DEFAULT_COLLECTION)
    with pytest.raises(ValueError, match="k must be at least 1"):
        retriever.retrieve("x", 0, collection=DEFAULT_COLLECTION)


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = reciprocal_rank_fusion({"dense": [1, 2, 3], "bm25": [3, 4, 1]})
    assert [item for item, _ in fused][:2] == [1, 3]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63)


CARDS = {"nike-2019": "FORM 10-K | NIKE 2019 10K | NIKE, Inc. | FISCAL YEAR ENDED MAY 31, 2019",
         "nike-2021": "FORM 10-K | NIKE 2021 10K | NIKE, Inc. | FISCAL YEAR ENDED MAY 31, 2021",
         "adobe-2019": "FORM 10-K | ADOBE 2019 10K | ADOBE INC. | fiscal year ended November 29, 2019",
         "notes": ""}


def test_documents_score_by_their_cards_terms_weighed_among_the_candidates():
    scores = score_documents("What were Nike's total current assets at the end of FY2019?", CARDS)
    assert scores["nike-2019"] == 1.0 and set(scores) == {"nike-2019", "nike-2021", "adobe-2019"}  # 'FY2019' meets '2019'
    # a card with one of the two names scores that name's share: here half, as each is on two of the three cards
    assert scores["nike-2021"] == scores["adobe-2019"] == 0.5
    assert score_documents("What are Nike's total current assets?", CARDS) == {"nike-2019": 1.0, "nike-2021": 1.0}  # a tie
    assert score_documents("total current assets", CARDS) == {}  # no card term in the question: no vote
    assert score_documents("Who sold the most in fiscal 2019?", {"tv": "Doctor Who"}) == {}  # not a name there


def test_hybrid_fusion_ranks_the_passage_of_the_document_the_question_names_first():
    def chunk(id_, doc_id, ordinal=LONG_DOCUMENT_CHUNKS + 40):
        return Chunk(doc_id, ordinal, "Total current assets 8,870 9,829", f"{doc_id}.pdf", 52, id=id_,
                     context=f"{CARDS[doc_id]}\nConsolidated Balance Sheets | p. 52" if CARDS[doc_id] else "p. 52")

    chunks = {1: chunk(1, "adobe-2019"), 2: chunk(2, "nike-2021"), 3: chunk(3, "nike-2019"), 4: chunk(4, "notes")}
    # Every filing's balance sheet matches the words; Nike's for fiscal 2019 is second in both legs.
    fused = reciprocal_rank_fusion({"dense": [1, 3, 2, 4], "bm25": [2, 3, 1, 4]})
    assert [id_ for id_, _ in fused][0] != 3
    ranked = Retriever._with_documents("What were Nike's total current assets in FY2019?", fused, chunks)
    assert [id_ for id_, _ in ranked][0] == 3
    assert ranked[-1] == fused[-1]  # a candidate whose document matches nothing keeps its fused score
    assert Retriever._with_documents("total current assets", fused, chunks) == fused
    # Nike's fiscal 2021 balance sheet first in both legs: the card naming the year the question asks still wins
    # (ranked, not scored, the second card's vote was 1 / 62 against 1 / 61, and 2021 stayed first)
    fused = reciprocal_rank_fusion({"dense": [2, 3, 1, 4], "bm25": [2, 3, 1, 4]})
    assert Retriever._with_documents("What were Nike's total current assets in FY2019?", fused, chunks)[0][0] == 3
    # A short document's passages carry its card themselves: it gets no second vote.
    chunks[3] = chunk(3, "nike-2019", ordinal=1)
    assert Retriever._with_documents("What were Nike's total current assets in FY2019?", fused, chunks)[0][0] != 3


def test_hits_cite_distinct_pages_first():
    chunks = {id_: Chunk(doc, 0, "text", f"{doc}.pdf", page, id=id_)
              for id_, doc, page in [(1, "a", 3), (2, "a", 3), (3, "a", 4), (4, "b", 3), (5, "c", None), (6, "c", None)]}
    ranked = [(id_, 1.0 / id_) for id_ in range(1, 7)]
    # The second chunk of page 3 of 'a' waits behind the first of every other page; page-less chunks never wait.
    assert [id_ for id_, _ in one_per_page_first(ranked, chunks)] == [1, 3, 4, 5, 6, 2]


def test_langchain_adapter_is_a_base_retriever(retriever):
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda

    adapter = retriever.as_langchain(DEFAULT_COLLECTION, k=2)
    assert isinstance(adapter, BaseRetriever)
    chain = adapter | RunnableLambda(lambda docs: [doc.metadata["source"] for doc in docs])
    sources = chain.invoke("configure proxies with environment variables")
    assert len(sources) == 2 and all(source.endswith(".md") for source in sources)
    # Scoped like every read: another collection's retriever finds none of these, and none is made without one.
    assert retriever.as_langchain("another-team", k=2).invoke("configure proxies with environment variables") == []
    with pytest.raises(TypeError):
        retriever.as_langchain(k=2)


def test_large_index_switches_to_ann_and_finds_the_same_top_hit(docs_dir, settings, embedder, monkeypatch):
    monkeypatch.setattr(rag.store.segments, "ANN_THRESHOLD", 10)  # a segment this large gets an IVF index
    IngestJob(settings, embedder).run(docs_dir)
    store = Store.open(settings.index_dir)
    assert store.manifest.index_type.startswith("IDMap2,IVF")
    hnsw_top = Retriever(store, embedder).retrieve("set a default timeout on a client", 1, "dense", collection=DEFAULT_COLLECTION)[0]
    assert hnsw_top.chunk.source.endswith("timeouts.md")


def test_a_chunks_vector_carries_its_context_and_each_text_is_embedded_once(embedder, monkeypatch):
    text = "| Total net revenue | 5,120 | 4,870 |\n| --- | --- | --- |\n| Operating income | 610 | 540 |"
    acme = Chunk("a", 40, text, "a.pdf", 41, context="Annual Report | Acme Corp. | fiscal year 2023\nResults | p. 41")
    globex = Chunk("g", 40, text, "g.pdf", 41, context="Annual Report | Globex Inc. | fiscal year 2019\nResults | p. 41")
    memo = Chunk("m", 0, "Revenue rose in the quarter.", "memo.txt", context="memo")
    long = {"a": LONG_DOCUMENT_CHUNKS + 40, "g": LONG_DOCUMENT_CHUNKS, "m": LONG_DOCUMENT_CHUNKS - 1}
    embedded = []
    encode = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda texts: embedded.extend(texts) or encode(texts))
    vectors = embedder.encode_chunks([acme, globex, acme, memo], long)
    # The long documents' shared text once, each context once, without the page; the Markdown rule never; the short
    # document's context and text in one input.
    assert sorted(embedded) == sorted([acme.embedded_text, "Annual Report | Acme Corp. | fiscal year 2023\nResults",
                                       "Annual Report | Globex Inc. | fiscal year 2019\nResults",
                                       "memo\nRevenue rose in the quarter."])
    assert "---" not in acme.embedded_text
    assert abs(vectors[0] @ vectors[2] - 1) < 1e-6 and abs(vectors[0] @ vectors[0] - 1) < 1e-5
    question = embedder.encode_query("What was Acme's total net revenue in fiscal 2023?")
    assert question @ vectors[0] > question @ vectors[1] + 0.02  # the same table, told apart by whose it is
    text_only = embedder.encode([acme.embedded_text])[0]
    assert question @ vectors[0] > question @ text_only


@pytest.fixture(scope="module", params=["fp32", "auto"])
def small_index(request, tmp_path_factory):
    """Four httpx pages (short and long documents) embedded at a forced and at this machine's own precision."""
    from rag.config import Settings
    from rag.embed import Embedder

    docs = tmp_path_factory.mktemp("pages")
    for page in ("advanced/timeouts.md", "advanced/clients.md", "quickstart.md", "async.md"):
        shutil.copy(CORPUS / "httpx" / page, docs / Path(page).name)
    embedder = Embedder(device="cpu", precision=request.param)
    settings = Settings(index_dir=docs.parent / f"index-{request.param}", parse_workers=1,
                        embedding_precision=request.param)
    IngestJob(settings, embedder).run(docs)
    return Retriever(Store.open(settings.index_dir, embedder.name), embedder)


def test_a_bm25_hits_similarity_is_that_of_the_vector_the_index_holds(small_index):
    retriever, embedder, query = small_index, small_index.embedder, "client timeout"
    lexical = retriever.retrieve(query, 8, "bm25", collection=DEFAULT_COLLECTION)
    dense = {hit.chunk.id: hit.scores["dense"]
             for hit in retriever.retrieve(query, 400, "dense", collection=DEFAULT_COLLECTION)}
    assert lexical and all(hit.chunk.id in dense for hit in lexical)
    sizes = {hit.chunk.doc_id: retriever.store.document(hit.chunk.doc_id, collection=DEFAULT_COLLECTION).chunk_count
             for hit in lexical}
    assert min(sizes.values()) < LONG_DOCUMENT_CHUNKS <= max(sizes.values())
    # Embedded now, the way ingestion embedded it (short and long documents alike): the same cosine, but for the
    # rounding of other batches at this precision...
    tolerance = COSINE_TOLERANCE[embedder.precision]
    similarities = retriever.similarities(query, lexical, collection=DEFAULT_COLLECTION)
    assert all(abs(similarity - dense[hit.chunk.id]) < tolerance for hit, similarity in zip(lexical, similarities))
    # ... which is well below what embedding them the other way (long documents in one input, short ones apart)
    # would change, so the tolerance does not hide that mistake.
    swapped = {doc_id: 1 if size >= LONG_DOCUMENT_CHUNKS else LONG_DOCUMENT_CHUNKS for doc_id, size in sizes.items()}
    other_way = embedder.encode_chunks([hit.chunk for hit in lexical], swapped, at_query_time=True)
    question = embedder.encode_queries([query])[0]
    assert max(abs(float(question @ vector) - dense[hit.chunk.id]) for hit, vector in zip(lexical, other_way)) \
        > 2 * tolerance

def test_a_page_whose_evidence_is_spread_over_chunks_outranks_one_slightly_better_chunk():
    chunks = {1: Chunk("a", 0, "caption", "a.pdf", page=19, id=1), 2: Chunk("a", 1, "rows", "a.pdf", page=19, id=2),
              3: Chunk("b", 0, "mention", "b.pdf", page=4, id=3), 4: Chunk("c", 0, "notes", "c.md", id=4)}
    ranked = by_page([(3, 1.2), (1, 1.0), (2, 0.9), (4, -3.0)], chunks)
    assert [id_ for id_, _ in ranked] == [1, 2, 3, 4]  # page 19's two chunks, then the single better chunk
    alone = by_page([(3, 1.2), (1, 1.0), (4, -3.0)], {i: chunks[i] for i in (1, 3, 4)})
    assert [id_ for id_, _ in alone] == [3, 1, 4]  # one chunk a page: the reranker's own order


def test_a_question_naming_a_statement_votes_for_that_statements_tables():
    cash = Chunk("a", 0, "| Net cash provided by operating activities | 5 |", "a.pdf", page=52, id=1,
                 context="Annual report | Globex\nCONSOLIDATED STATEMENTS OF CASH FLOWS | cash flow statement | p. 52")
    prose = Chunk("a", 1, "Cash flows improved.", "a.pdf", page=30, id=2, context="Annual report | Globex\nMD&A | p. 30")
    chunks = {1: cash, 2: prose}
    fused = [(2, 0.030), (1, 0.028)]
    assert [i for i, _ in with_statements("What was capital expenditure in FY2018 (cash flow statement)?",
                                           fused, chunks)] == [1, 2]
    assert with_statements("Who is the chief executive?", fused, chunks) == fused
