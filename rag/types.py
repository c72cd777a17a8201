"""Typed records passed between the stages (the seams of the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one document, small enough for the embedding model, with where it came from."""

    doc_id: str
    ordinal: int  # position within its document
    text: str
    source: str  # path of the document
    page: int | None = None
    heading: str | None = None
    element_type: str | None = None
    tokens: int = 0  # embedding-model tokens
    hash: str = ""  # sha256 of text
    id: int | None = None  # assigned by the store; also the FAISS id

    @property
    def location(self) -> str:
        parts = [self.source]
        if self.page is not None:
            parts.append(f"p. {self.page}")
        if self.heading:
            parts.append(f"§ {self.heading}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class ScoredChunk:
    chunk: Chunk
    score: float
    rank: int  # 1-based
    retriever: str  # 'dense', 'bm25' or 'hybrid'
    scores: dict[str, float] = field(default_factory=dict)  # per-retriever scores that fed a fused result
