"""Token-aware chunking: elements packed into full chunks with their document's context, never past the embedder's limit."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

from ingest.context import describe
from ingest.load import Element, LoadedDocument
from ingest.pdf import PARSER_VERSION
from rag.config import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS
from rag.errors import UserError
from rag.statements import statement_of
from rag.types import Chunk


# Recorded per document (with the chunk settings): a document built by another parser or chunker is re-chunked.
# 3: the context is embedded beside the text, not with it (`Embedder.encode_chunks`), so older vectors are stale.
CHUNKER_VERSION = f"packed-context-4/{PARSER_VERSION}"
# A chunk holding a table (a Markdown row): the only chunks named as a financial statement in their context.
TABLE_ROW = re.compile(r"^\| ", re.M)


@dataclass(frozen=True, slots=True)
class ChunkSettings:
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Chunker:
    """Splits a document's elements into chunks of at most `chunk_tokens` embedding tokens.

    Consecutive elements are packed into chunks (no one-line chunks); every chunk carries a context line with its
    document's title, issuer and period, its section heading and page, indexed with its text and embedded beside it
    (`Embedder.encode_chunks`). Tokens are counted with the embedding model's own tokenizer; the limit leaves room
    for its special tokens.
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
        self.content_limit = content_limit

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def counts(self, texts: list[str]) -> list[int]:
        """`count` of each text, in one tokenizer call (a document's elements: thousands of calls saved)."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
        return [len(ids) for ids in encoded]

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

    def chunk(self, document: LoadedDocument, doc_id: str, source: str) -> list[Chunk]:
        """Elements packed in order into chunks of up to `chunk_tokens`, each with its document's context line."""
        facts = describe(document, source)
        packed = list(self._pack(document.elements))
        return [
            Chunk(
                doc_id=doc_id,
                ordinal=ordinal,
                text=text,
                source=source,
                page=page,
                page_end=page_end if page_end != page else None,
                heading=heading,
                element_type=element_type,
                tokens=tokens,
                hash=text_hash(text),
                context=facts.context(heading, page, statement_of(heading or "", text) if TABLE_ROW.search(text) else ""),
            )
            for ordinal, ((text, page, page_end, heading, element_type), tokens)
            in enumerate(zip(packed, self.counts([text for text, *_ in packed])))
        ]

    def _pack(self, elements: list[Element]):
        """Yields (text, first page, last page, heading, element type): small elements merged into full chunks,
        large ones split.

        A chunk is closed early at a new heading (when a quarter full) or page (when half full), so chunks mostly
        stay within one section and one page (what a reader cites). Table pieces each start with the table's header rows.
        """
        parts: list[str] = []
        used, budget = 0, self.settings.chunk_tokens
        page = last_page = heading = kind = None

        def close():
            nonlocal parts, used
            if parts:
                yield "\n\n".join(parts), page, last_page, heading, kind
            parts, used = [], 0

        def start(element: Element):
            nonlocal page, last_page, heading, kind
            page, last_page, heading, kind = element.page, element.page, element.heading, element.category

        def reaches(element: Element):
            nonlocal last_page
            end = element.page_end or element.page
            if end is not None and (last_page is None or end > last_page):
                last_page = end

        for element, size in zip(elements, self.counts([element.text for element in elements])):
            if parts and (used >= budget // 4 and element.heading != heading or used >= budget // 2 and element.page != page):
                yield from close()
            if parts and used + size + 1 > budget and size < budget:  # (one too big for any chunk is split below)
                yield from close()
            if element.category == "Title" and element.text == element.heading and not parts:
                continue  # the heading of the next chunk: its context line carries it
            if not parts:
                start(element)
            if size <= budget - used:
                parts.append(element.text)
                reaches(element)
                used += size + 1
                if element.category != kind and element.category != "Title":
                    kind = element.category if kind == "Title" else "Mixed"
                continue
            # Too big for any one chunk: split it; its last piece stays open for the elements that follow. A few
            # short lines pending on its page (a name, a caption) lead its first piece instead of making a chunk.
            lead = "\n\n".join(parts) if parts and used < budget // 4 and page == element.page else ""
            if not lead:
                yield from close()
            parts, used = [], 0
            start(element)
            reaches(element)
            pieces = list(self._split(element, budget, lead))
            for piece in pieces[:-1]:
                yield piece, page, last_page, heading, element.category
            parts, used = [pieces[-1]], self.count(pieces[-1]) + 1
        yield from close()

    def _split(self, element: Element, budget: int, lead: str = ""):
        if element.category == "Table":
            yield from self._split_table(element, budget, lead)
            return
        # Joined by a space: at a line break, the splitter would emit the lead as a piece of its own.
        text = f"{lead} {element.text}" if lead else element.text
        for document in self._splitter(budget).create_documents([text]):
            yield document.page_content

    def _split_table(self, element: Element, budget: int, lead: str = ""):
        """Rows in groups that fit, each group under the table's header rows (the first also under `lead`)."""
        header = element.header
        header_tokens = self.count(header) + 1 if header else 0
        if header_tokens > budget // 2:  # a header as long as the budget: rows go without it
            header, header_tokens = "", 0
        body = element.text.removeprefix(element.header).lstrip("\n")
        top = [part for part in (lead, header) if part]
        rows, used = [], header_tokens + (self.count(lead) + 2 if lead else 0)
        for row in body.split("\n"):
            size = self.count(row) + 1
            if used + size > budget and (rows or lead in top):  # full (or the lead leaves no room for a row)
                yield "\n".join(top + rows)
                rows, used, top = [], header_tokens, [header] if header else []
            if size > budget - header_tokens:  # one row longer than a chunk: split as text
                yield from (d.page_content for d in self._splitter(budget - header_tokens).create_documents([row]))
                continue
            rows.append(row)
            used += size
        if rows:
            yield "\n".join(top + rows)
