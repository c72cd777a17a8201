"""Adapter so our retriever drops into LangChain chains as a `BaseRetriever`."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from rag.config import DEFAULT_SEARCH_RESULTS
from rag.types import RetrieverKind


class LangChainRetriever(BaseRetriever):
    """`Retriever.as_langchain(collection)`; each Document's metadata carries source, page, chunk id, score and rank.
    It searches one collection, named when it is made: there is no default that could widen it."""

    retriever: Any
    collection: str
    k: int = DEFAULT_SEARCH_RESULTS
    kind: str = RetrieverKind.HYBRID.value

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [
            Document(
                page_content=hit.chunk.text,
                metadata={"source": hit.chunk.name, "page": hit.chunk.page, "heading": hit.chunk.heading,
                          "chunk_id": hit.chunk.id, "score": hit.score, "rank": hit.rank, "retriever": hit.retriever},
            )
            for hit in self.retriever.retrieve(query, self.k, self.kind, collection=self.collection)
        ]
