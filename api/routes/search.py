"""POST /v1/search: the ranked chunks for a query, without generation."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from api.auth import authorize
from api.deps import ServiceDep
from api.schemas import SearchHit, SearchRequest, SearchResponse
from api.threads import run_blocking
from rag.types import Role

router = APIRouter(tags=["search"])


@router.post("/search", response_model=SearchResponse, summary="Find the chunks most relevant to a query")
async def search(body: SearchRequest, service: ServiceDep, request: Request) -> SearchResponse:
    collection = authorize(request, body.collection, Role.READ)
    retriever = service.retriever  # one snapshot for the whole request, even if a new one is swapped in
    started = time.perf_counter()
    hits = await run_blocking(retriever.retrieve, body.query, body.k, body.retriever, body.source,
                              collection=collection)
    seconds = time.perf_counter() - started
    service.metrics.retrieval_seconds.observe(seconds)
    results = [SearchHit(**hit.to_dict()) for hit in hits]
    return SearchResponse(query=body.query, collection=collection, retriever=body.retriever, results=results,
                          timings={"retrieve_ms": round(seconds * 1000, 3)})
