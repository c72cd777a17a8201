"""POST /v1/search: the ranked chunks for a query, without generation."""

from __future__ import annotations

import time

from fastapi import APIRouter
from api.threads import run_blocking

from api.answering import domain_errors
from api.deps import ServiceDep
from api.schemas import SearchHit, SearchRequest, SearchResponse

router = APIRouter(tags=["search"])


@router.post("/search", response_model=SearchResponse, summary="Find the chunks most relevant to a query")
async def search(body: SearchRequest, service: ServiceDep) -> SearchResponse:
    retriever = service.retriever  # one snapshot for the whole request, even if a new one is swapped in
    started = time.perf_counter()
    with domain_errors():
        hits = await run_blocking(retriever.retrieve, body.query, body.k, body.retriever, body.source)
    seconds = time.perf_counter() - started
    service.metrics.retrieval_seconds.observe(seconds)
    results = [SearchHit(rank=hit.rank, score=hit.score, chunk_id=hit.chunk.id, doc_id=hit.chunk.doc_id,
                         source=hit.chunk.source, page=hit.chunk.page, heading=hit.chunk.heading,
                         text=hit.chunk.text, scores=hit.scores) for hit in hits]
    return SearchResponse(query=body.query, retriever=body.retriever, results=results,
                          timings={"retrieve_ms": round(seconds * 1000, 3)})
