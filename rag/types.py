"""Typed records passed between the stages (the seams of the pipeline)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from rag.errors import UserError


class Choice(str, Enum):
    """A closed set of option strings (CLI flags, API fields, settings) whose `parse` names the valid values."""

    def __init_subclass__(cls, label: str = "value", **kwargs):
        super().__init_subclass__(**kwargs)
        cls.label = label

    @classmethod
    def parse(cls, value: str | Choice):
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"Unknown {cls.label} '{value}'. Supported: {[member.value for member in cls]}") from None


# A Markdown table's rule under its header row ("| --- | --- |"): no words, yet a tenth of a table chunk's tokens.
MARKDOWN_TABLE_RULE = re.compile(r"^(?=.*\|)(?=.*---)[|:\- \t]+$\n?", re.M)

# A document of this many chunks or more is long: a passage deep inside it does not say whose it is, so retrieval
# votes for its document by its card (`rag.retrieve`) and its context is embedded apart (`Embedder.encode_chunks`).
# A short document's passages carry its title themselves.
LONG_DOCUMENT_CHUNKS = 8

DEFAULT_COLLECTION = "default"
MAX_COLLECTION_NAME = 64  # characters in a collection name (the API's fields and the library's check)
_COLLECTION_NAME = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_COLLECTION_NAME - 1}}}")


def check_collection(name: str) -> str:
    """A collection name: 1-MAX_COLLECTION_NAME (64) lower-case letters, digits, '_' or '-', starting with a letter
    or digit.

    >>> check_collection("finance-2024")
    'finance-2024'
    """
    if not isinstance(name, str) or not _COLLECTION_NAME.fullmatch(name):
        shown = name[:70] if isinstance(name, str) else type(name).__name__
        raise UserError(f"Invalid collection name '{shown}': use 1-{MAX_COLLECTION_NAME} lower-case letters, digits, "
                        "'_' or '-', starting with a letter or digit.")
    return name


class AnswerPath(Choice, label="path"):
    """How a question is answered: with or without retrieval, by the base decoder or the fine-tuned one."""

    PROMPT = "prompt"
    RAG = "rag"
    FINETUNED = "finetuned"
    FINETUNED_RAG = "finetuned-rag"

    @property
    def retrieves(self) -> bool:
        return self in (AnswerPath.RAG, AnswerPath.FINETUNED_RAG)

    @property
    def finetuned(self) -> bool:
        return self in (AnswerPath.FINETUNED, AnswerPath.FINETUNED_RAG)


class RetrieverKind(Choice, label="retriever"):
    DENSE = "dense"
    BM25 = "bm25"
    HYBRID = "hybrid"


# Every collection: the scope of an API key that may use them all, and of maintenance reads (statistics,
# compaction, the operator's `rag info`). A read must name it; nothing means "everything" by omission.
ALL_COLLECTIONS = "*"


def collection_filter(collection: str) -> str | None:
    """The one collection a store read is limited to, or None for `ALL_COLLECTIONS`.

    A read without a scope is refused instead of read as "every collection": one forgotten argument would otherwise
    be a leak between tenants.

    >>> collection_filter("finance"), collection_filter(ALL_COLLECTIONS)
    ('finance', None)
    """
    if collection is None:
        raise TypeError("A store read needs an explicit collection: a name, or ALL_COLLECTIONS (maintenance only).")
    return None if collection == ALL_COLLECTIONS else check_collection(collection)


class Role(Choice, label="role"):
    """What a key may do, each role including the ones before it."""

    READ = "read"  # search, ask, chat, read documents, passages, sources, jobs and evaluation reports
    WRITE = "write"  # also upload and delete documents
    ADMIN = "admin"  # also manage keys

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one document, small enough for the embedding model, with where it came from."""

    doc_id: str
    ordinal: int  # position within its document
    text: str
    source: str  # the document's path on the server: its identity in the index, never shown to users
    page: int | None = None
    heading: str | None = None
    element_type: str | None = None
    tokens: int = 0  # embedding-model tokens
    hash: str = ""  # sha256 of text
    id: int | None = None  # assigned by the store; also the FAISS id
    # Document-level context that a passage from deep inside a long document does not state itself ("the Company",
    # "three months ended"): a line with the document's card (title, issuer, period), then one with its section and
    # page. Indexed with the text and embedded beside it (`Embedder.encode_chunks`), not quoted.
    context: str = ""
    # What users and API clients are shown for `source`: its document's `DocumentRecord.name`, filled in by the store.
    name: str = ""
    # The last page the chunk covers when it runs past a page break (a table continued overleaf); None: `page` only.
    page_end: int | None = None

    @property
    def document_card(self) -> str:
        """The first line of a two-line context: the document's title, issuer and period ('' if it has none)."""
        card, newline, _ = self.context.partition("\n")
        return card if newline else ""

    @property
    def indexed_text(self) -> str:
        """What the lexical index sees: the context line, then the passage."""
        return f"{self.context}\n{self.text}" if self.context else self.text

    @property
    def embedded_text(self) -> str:
        """The passage as the embedder sees it: without Markdown table rules, which say nothing."""
        return MARKDOWN_TABLE_RULE.sub("", self.text).strip() or self.text

    @property
    def context_fields(self) -> list[str]:
        """The second line of the context: section, financial statement, page (those it has)."""
        return self.context.rpartition("\n")[2].split(" | ") if self.context else []

    @property
    def embedded_context(self) -> str:
        """The context as the embedder sees it: without the page, a number that says nothing to it (and without
        which all chunks of a section share one context to embed)."""
        card, _, where = self.context.rpartition("\n")
        fields = where.split(" | ")
        if self.page is not None and fields[-1] == page_label(self.page):
            fields.pop()
        where = " | ".join(fields)
        return f"{card}\n{where}" if card and where else card or where

    @property
    def location(self) -> str:
        parts = [self.name or self.source]
        if self.page is not None:
            parts.append(page_label(self.page))
        if self.heading:
            parts.append(f"§ {self.heading}")
        return ", ".join(parts)


def page_label(page: int) -> str:
    """A page as contexts and citations write it."""
    return f"p. {page}"


@dataclass(frozen=True, slots=True)
class ScoredChunk:
    chunk: Chunk
    score: float
    rank: int  # 1-based
    retriever: str  # 'dense', 'bm25' or 'hybrid'
    scores: dict[str, float] = field(default_factory=dict)  # per-retriever scores that fed a fused result

    def to_dict(self) -> dict:
        """A search hit as JSON: each hit of `rag search --json` and of POST /v1/search."""
        chunk = self.chunk
        return {"rank": self.rank, "score": round(self.score, 6), "chunk_id": chunk.id, "doc_id": chunk.doc_id,
                "source": chunk.name, "page": chunk.page, "page_end": chunk.page_end, "heading": chunk.heading,
                "text": chunk.text,
                "scores": {name: round(score, 6) for name, score in self.scores.items()}}
