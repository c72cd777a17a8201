"""Token-aware chunking: sections (a heading and its text) split with overlap, never past the embedder's limit."""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from itertools import groupby

from langchain_text_splitters import RecursiveCharacterTextSplitter

from ingest.load import Element
from rag.config import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS
from rag.errors import UserError
from rag.types import Chunk


@dataclass(frozen=True, slots=True)
class ChunkSettings:
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Chunker:
    """Splits a document's elements into chunks of at most `chunk_tokens` embedding tokens.

    Elements are grouped into sections by the heading they sit under, so a chunk never mixes two sections
    and every chunk of a section starts with its heading (retrieval then sees what the text is about).
    Tokens are counted with the embedding model's own tokenizer; the limit leaves room for its special tokens.
    """

    def __init__(self, tokenizer, settings: ChunkSettings, max_model_tokens: int):
        content_limit = max_model_tokens - 2  # [CLS] and [SEP]
        if settings.chunk_tokens > content_limit:
            raise UserError(
                f"chunk_tokens={settings.chunk_tokens} exceeds the embedding model's limit of {content_limit} "
                "content tokens; longer chunks would be truncated when embedded"
            )
        # Whole sections are tokenised to measure them; the tokenizer's 'longer than max length' warning is noise.
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        self.tokenizer = tokenizer
        self.settings = settings

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _splitter(self, size: int) -> RecursiveCharacterTextSplitter:
        return RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            self.tokenizer,
            chunk_size=size,
            chunk_overlap=min(self.settings.chunk_overlap, size // 2),
            separators=["\n\n", "\n", ". ", "; ", ", ", " ", ""],
            add_start_index=True,
            keep_separator="end",  # a sentence keeps its full stop instead of the next chunk starting with it
            strip_whitespace=True,
        )

    def chunk(self, elements: list[Element], doc_id: str, source: str) -> list[Chunk]:
        chunks: list[Chunk] = []
        for heading, section in groupby(elements, key=lambda element: element.heading):
            section = list(section)
            body_elements = [e for e in section if not (e.category == "Title" and e.text == heading)]
            if not body_elements:  # a heading directly followed by a subheading: it lives on in no chunk of its own
                continue
            for text, page, element_type in self._split_section(heading, body_elements):
                chunks.append(
                    Chunk(
                        doc_id=doc_id,
                        ordinal=len(chunks),
                        text=text,
                        source=source,
                        page=page,
                        heading=heading,
                        element_type=element_type,
                        tokens=self.count(text),
                        hash=text_hash(text),
                    )
                )
        return chunks

    def _split_section(self, heading: str | None, elements: list[Element]):
        """Yields (text, page, element type) per chunk; page and type are those of the element it starts in."""
        starts, pieces, offset = [], [], 0
        for element in elements:
            starts.append(offset)
            pieces.append(element.text)
            offset += len(element.text) + 2
        body = "\n\n".join(pieces)
        prefix = f"{heading}\n" if heading else ""
        # The heading is repeated on every chunk, so the body gets what the heading leaves of the budget.
        body_budget = self.settings.chunk_tokens - (self.count(prefix) if prefix else 0)
        if body_budget < self.settings.chunk_tokens // 2:  # absurdly long heading: keep it inside the body instead
            prefix, body_budget = "", self.settings.chunk_tokens
        for document in self._splitter(body_budget).create_documents([body]):
            element_index = max(0, bisect.bisect_right(starts, document.metadata["start_index"]) - 1)
            element = elements[element_index]
            yield prefix + document.page_content, element.page, element.category
