"""Every read of the embedded store finds the best hits within its scope, for small (exact) segments and for a
segment large enough for an IVF index, before deletes, after them (tombstones beside the IVF segment) and after
compaction. The reference is an exact search, in numpy, over the vectors written minus the deleted ones, restricted
the same way; the IVF store must reach recall@10 ANN_RECALL against it."""

from __future__ import annotations

import fnmatch
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rag.retrieve import HYBRID_CANDIDATES, Retriever, reciprocal_rank_fusion
from rag.store import DocumentRecord, Store, compact
from rag.store.segments import ANN_THRESHOLD
from rag.types import ALL_COLLECTIONS, DEFAULT_COLLECTION, Chunk

MODEL, DIMENSION, CHUNKING = "synthetic", 32, {"chunk_tokens": 10}
CHUNKS_PER_DOC = 40
TOPICS, TOPIC_SPREAD = 48, 1.5  # vectors: a topic's centre plus noise, so neighbours are mostly of one topic
VOCABULARY, WORDS_PER_CHUNK = 400, 4  # pseudo-words: each in ~600 of 60k chunks, within the lexical budget
PARTS = 7  # documents are spread over /corpus/<collection>/part<n>/ folders; SOURCE picks one of them
SOURCE = "part3/*"
QUERIES, K = 20, 10
HYBRID_QUERIES = 10  # of QUERIES: each also filters by source in Python (`ids_with_source`), the slow part
ANN_RECALL = 0.95
# Collections by document number: ~10% in "tenth", ~1% in "hundredth", the rest in the default one.
TENTH, HUNDREDTH = "tenth", "hundredth"
# (collection, source glob) of each scope tried; ALL_COLLECTIONS without a glob is the unscoped read.
SCOPES = {"unscoped": (ALL_COLLECTIONS, None), "collection 10%": (TENTH, None), "collection 1%": (HUNDREDTH, None),
          "source": (ALL_COLLECTIONS, SOURCE), "collection 10% + source": (TENTH, SOURCE)}
STATES = ("fresh", "deleted", "compacted")
# Store kinds: chunks per commit. "flat": small segments only; "ivf": one segment of ANN_THRESHOLD or more.
KINDS = {"flat": [2_400, 2_400, 2_400], "ivf": [60_000]}


def collection_of(doc: int) -> str:
    return HUNDREDTH if doc % 100 == 7 else TENTH if doc % 10 == 3 else DEFAULT_COLLECTION


def source_of(doc: int) -> str:
    return f"/corpus/{collection_of(doc)}/part{doc % PARTS}/doc{doc:05d}.md"


@dataclass
class Written:
    """What the test wrote, by document: the reference the store's answers are checked against."""

    vectors: dict[str, np.ndarray]  # doc_id → (CHUNKS_PER_DOC, DIMENSION)
    collection: dict[str, str]
    source: dict[str, str]


class Corpus:
    """Seeded synthetic documents: clustered unit vectors and texts of pseudo-words (letters only, lower case, so
    the retriever's document-name vote stays out of the fusion)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((TOPICS, DIMENSION)).astype(np.float32)
        syllables = ["ka", "lo", "mi", "ru", "te", "sa", "no", "vi", "be", "du"]
        words = ["".join(parts) for parts in itertools.product(syllables, repeat=3)]
        self.words = [words[i] for i in rng.choice(len(words), VOCABULARY, replace=False)]

    def vectors(self, count: int, rng: np.random.Generator) -> np.ndarray:
        topics = rng.integers(0, TOPICS, count)
        x = self.centres[topics] + TOPIC_SPREAD * rng.standard_normal((count, DIMENSION)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def texts(self, count: int, rng: np.random.Generator) -> list[str]:
        picks = rng.integers(0, VOCABULARY, (count, WORDS_PER_CHUNK))
        return [" ".join(self.words[i] for i in row) for row in picks]

    def documents(self, docs: list[int], version: int = 0) -> list[tuple[DocumentRecord, list[Chunk], np.ndarray]]:
        """(record, chunks, vectors) of each document, drawn in one batch; another version is another file."""
        rng = np.random.default_rng([len(docs), *docs[:1], version])
        count = len(docs) * CHUNKS_PER_DOC
        texts, vectors = self.texts(count, rng), self.vectors(count, rng)
        made = []
        for n, doc in enumerate(docs):
            rows = slice(n * CHUNKS_PER_DOC, (n + 1) * CHUNKS_PER_DOC)
            doc_id, source = f"doc{doc:05d}", source_of(doc)
            chunks = [Chunk(doc_id, j, text, source, tokens=WORDS_PER_CHUNK) for j, text in enumerate(texts[rows])]
            record = DocumentRecord(doc_id, source, f"hash{doc}-{version}", 1, 1, "{}", CHUNKS_PER_DOC,
                                    "2026-01-01T00:00:00", collection_of(doc))
            made.append((record, chunks, vectors[rows]))
        return made


def write(index: Path, corpus: Corpus, written: Written, adds=(), deletes=(), changed=()) -> None:
    """One commit: new documents, deleted ones, and changed ones (a new version of the file: re-ingested)."""
    store = Store.begin(index, MODEL, DIMENSION, CHUNKING)
    for record, chunks, vectors in corpus.documents(list(adds)) + corpus.documents(list(changed), version=1):
        store.add_document(record, chunks, vectors)
        written.vectors[record.doc_id] = vectors
        written.collection[record.doc_id], written.source[record.doc_id] = record.collection, record.source
    doc_ids = [f"doc{doc:05d}" for doc in deletes]
    store.delete(doc_ids)
    for doc_id in doc_ids:
        for table in (written.vectors, written.collection, written.source):
            table.pop(doc_id)
    store.commit()
    store.close()


@dataclass
class Truth:
    """The live chunks of one state, by chunk id, for exact restricted search."""

    ids: np.ndarray
    vectors: np.ndarray
    collection: np.ndarray
    source: np.ndarray

    @classmethod
    def of(cls, index: Path, written: Written) -> "Truth":
        store = Store.open(index, MODEL, DIMENSION)
        chunks = list(store.iter_chunks(collection=ALL_COLLECTIONS))
        store.close()
        assert {chunk.doc_id for chunk in chunks} == set(written.vectors)  # the rows hold what was written
        return cls(np.array([chunk.id for chunk in chunks], np.int64),
                   np.stack([written.vectors[chunk.doc_id][chunk.ordinal] for chunk in chunks]),
                   np.array([written.collection[chunk.doc_id] for chunk in chunks]),
                   np.array([written.source[chunk.doc_id] for chunk in chunks]))

    def within(self, scope: str) -> np.ndarray:
        """Which chunks a scope holds (a mask over `ids`): of its collection (or every one), with a source matching
        its glob as `ids_with_source` reads it."""
        collection, source = SCOPES[scope]
        keep = np.ones(len(self.ids), bool) if collection == ALL_COLLECTIONS else self.collection == collection
        if source is not None:
            paths, of_chunk = np.unique(self.source, return_inverse=True)
            keep &= np.array([fnmatch.fnmatch(path, f"*/{source}") for path in paths])[of_chunk]
        return keep

    def dense(self, query: np.ndarray, k: int, within: np.ndarray) -> list[int]:
        """The exact top k by inner product among the chunks of `within`, ties by id as the store breaks them."""
        scores, ids = (self.vectors @ query)[within], self.ids[within]
        return ids[np.lexsort((ids, -scores))[:k]].tolist()


@dataclass
class Built:
    kind: str
    indexes: dict[str, Path]  # by state
    truths: dict[str, Truth]
    deleted: dict[str, set[str]]  # doc ids gone in each state


def build(root: Path, kind: str, corpus: Corpus) -> Built:
    """The fresh index; a copy with 2% of its documents deleted (from every collection and folder) and a few
    changed (re-ingested: a new small segment); a copy of that one compacted."""
    written = Written({}, {}, {})
    fresh = root / kind / "fresh"
    first = 0
    for size in KINDS[kind]:
        docs = size // CHUNKS_PER_DOC
        write(fresh, corpus, written, adds=range(first, first + docs))
        first += docs
    indexes, truths, deleted = {"fresh": fresh}, {}, {"fresh": set()}
    truths["fresh"] = Truth.of(fresh, written)

    indexes["deleted"] = root / kind / "deleted"
    shutil.copytree(fresh, indexes["deleted"])
    gone = [doc for doc in range(first) if doc % 97 == 7 or doc % 91 == 3][:first // 50]
    changed = [doc for doc in range(first) if doc % 89 == 5 and doc not in gone][:5]
    write(indexes["deleted"], corpus, written, deletes=gone, changed=changed)
    deleted["deleted"] = {f"doc{doc:05d}" for doc in gone}
    truths["deleted"] = Truth.of(indexes["deleted"], written)

    indexes["compacted"] = root / kind / "compacted"
    shutil.copytree(indexes["deleted"], indexes["compacted"])
    compact(indexes["compacted"])
    deleted["compacted"], truths["compacted"] = deleted["deleted"], truths["deleted"]
    return Built(kind, indexes, truths, deleted)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


@pytest.fixture(scope="module", params=list(KINDS))
def built(request, tmp_path_factory, corpus) -> Built:
    return build(tmp_path_factory.mktemp("scale"), request.param, corpus)


@pytest.fixture(scope="module")
def queries(corpus) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(4242)
    return corpus.vectors(QUERIES, rng), [" ".join(corpus.texts(1, rng)[0].split()[:2]) for _ in range(QUERIES)]


@pytest.fixture(scope="module")
def rankings(built, queries) -> dict[str, list[list[tuple[int, float]]]]:
    """By state: every match of each query text, best first (the unscoped ranking that scoped ones are cut from)."""
    found = {}
    for state, index in built.indexes.items():
        store = Store.open(index, MODEL, DIMENSION)
        found[state] = [store.lexical(text, len(built.truths[state].ids), collection=ALL_COLLECTIONS)
                        for text in queries[1]]
        store.close()
    return found


def open_state(built: Built, state: str):
    store = Store.open(built.indexes[state], MODEL, DIMENSION)
    manifest = store.manifest
    if built.kind == "ivf":  # the large segment kept its IVF index through deletes and compaction
        assert manifest.index_type.startswith("IDMap2,IVF") and manifest.vectors >= ANN_THRESHOLD
    else:
        assert manifest.index_type == "IDMap2,Flat"
    return store


def scoped(store, scope: str) -> tuple[str, np.ndarray | None]:
    collection, source = SCOPES[scope]
    return collection, (store.ids_with_source(source, collection=collection) if source else None)


def assert_best(got: list[int], expected: list[int], kind: str) -> float:
    """Exact equality for exact segments; recall (returned, for averaging) for the IVF store."""
    if kind == "flat":
        assert got == expected
    return len(set(got) & set(expected)) / max(len(expected), 1)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_dense_finds_the_best_hits_within_scope(built, queries, state, scope):
    store, truth = open_state(built, state), built.truths[state]
    collection, allowed = scoped(store, scope)
    within = truth.within(scope)
    assert allowed is None or set(allowed.tolist()) == set(truth.ids[within].tolist())
    recalls = []
    for query in queries[0]:
        hits = store.dense(query, K, allowed, collection=collection)
        recalls.append(assert_best([id_ for id_, _ in hits], truth.dense(query, K, within), built.kind))
    assert np.mean(recalls) >= ANN_RECALL
    store.close()


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_dense_never_returns_a_deleted_or_out_of_scope_chunk(built, queries, state, scope):
    store, truth = open_state(built, state), built.truths[state]
    collection, allowed = scoped(store, scope)
    within = set(truth.ids[truth.within(scope)].tolist())
    for query in queries[0]:
        hits = store.dense(query, 100, allowed, collection=collection)
        assert len(hits) == min(100, len(within)) and {id_ for id_, _ in hits} <= within
        assert not {chunk.doc_id for chunk in store.get([id_ for id_, _ in hits], collection=ALL_COLLECTIONS)
                    } & built.deleted[state]
    store.close()


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_lexical_finds_the_best_hits_within_scope(built, queries, rankings, state, scope):
    """The reference is the unscoped ranking of every match, filtered to the scope (FTS5 is exact, so this checks
    that a scope leaves out nothing it holds and lets in nothing it does not)."""
    store, truth = open_state(built, state), built.truths[state]
    collection, allowed = scoped(store, scope)
    within = set(truth.ids[truth.within(scope)].tolist())
    for text, everything in zip(queries[1], rankings[state]):
        assert {id_ for id_, _ in everything} <= set(truth.ids.tolist())  # no deleted chunk matches
        expected = [(id_, score) for id_, score in everything if id_ in within][:K]
        hits = store.lexical(text, K, allowed, collection=collection)
        assert [score for _, score in hits] == pytest.approx([score for _, score in expected])
        tied = {id_ for id_, score in expected if score == pytest.approx(expected[-1][1])} if expected else set()
        assert {id_ for id_, _ in hits} - tied == {id_ for id_, _ in expected} - tied
    store.close()


class GivenVectors:
    """An embedder without a model: each query text's vector is the one the test drew for it."""

    def __init__(self, texts: list[str], vectors: np.ndarray):
        self.by_text = dict(zip(texts, vectors))

    def follow(self, index_weights: str | None) -> None:
        pass

    def encode_query(self, text: str) -> np.ndarray:
        return self.by_text[text]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("scope", list(SCOPES))
def test_hybrid_finds_the_best_hits_within_scope(built, queries, state, scope):
    """`Retriever.retrieve` against the fusion of exact dense and the scoped lexical ranking (checked above)."""
    store, truth = open_state(built, state), built.truths[state]
    collection, source = SCOPES[scope]
    within = truth.within(scope)
    vectors, texts = queries
    retriever = Retriever(store, GivenVectors(texts, vectors), "hybrid")
    allowed = store.ids_with_source(source, collection=collection) if source else None
    recalls = []
    for vector, text in zip(vectors[:HYBRID_QUERIES], texts):
        hits = retriever.retrieve(text, K, source=source, collection=collection)
        legs = {"dense": truth.dense(vector, HYBRID_CANDIDATES, within),
                "bm25": [id_ for id_, _ in store.lexical(text, HYBRID_CANDIDATES, allowed, collection=collection)]}
        expected = [id_ for id_, _ in reciprocal_rank_fusion(legs)[:K]]
        recalls.append(assert_best([hit.chunk.id for hit in hits], expected, built.kind))
    assert np.mean(recalls) >= ANN_RECALL
    store.close()
