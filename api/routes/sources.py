"""What a citation points at: the whole passage (GET /v1/chunks/{id}) and the original file (GET
/v1/documents/{doc_id}/file), so a reader can check an answer against its source.

Only files the index records as ingested documents are served, and only while their content still has the hash
that was ingested (otherwise the cited pages may no longer be what the answer quoted). Headers: api/files.py.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Path as PathParam
from starlette.concurrency import run_in_threadpool

from api.auth import ReadScope
from api.deps import ServiceDep
from api.errors import ApiError
from api.files import MEDIA_TYPES, untrusted_file
from api.schemas import PassageOut
from rag.models import sha256_files

router = APIRouter(tags=["sources"])


@router.get("/chunks/{chunk_id}", response_model=PassageOut, summary="The full passage a citation points at",
            responses={404: {"description": "No such chunk in the current index."}})
async def passage(chunk_id: Annotated[int, PathParam(ge=0, le=2**62)], service: ServiceDep,
                  collection: ReadScope) -> PassageOut:
    store = service.retriever.store
    found = await run_in_threadpool(partial(store.get, [chunk_id], collection=collection))  # another collection's chunk: none
    if not found:
        raise ApiError(404, "chunk_not_found", f"No chunk {chunk_id} in the current index (a later ingestion may "
                       "have replaced it: ask again).")
    chunk = found[0]
    return PassageOut(chunk_id=chunk_id, doc_id=chunk.doc_id, source=chunk.name, page=chunk.page,
                      heading=chunk.heading, text=chunk.text)


@router.get("/documents/{doc_id}/file", summary="The original file of a document (PDF inline, text as text/plain)",
            responses={200: {"content": {media: {} for media in MEDIA_TYPES}},
                       404: {"description": "No such document, or its file is gone."},
                       409: {"description": "The file changed since it was ingested."}})
async def original_file(doc_id: Annotated[str, PathParam(max_length=64)], service: ServiceDep,
                        collection: ReadScope):
    store = service.retriever.store
    record = await run_in_threadpool(partial(store.document, doc_id, collection=collection))
    if record is None:
        raise ApiError(404, "document_not_found", f"No document '{doc_id}' in the index.")
    path = Path(record.source)
    if not await run_in_threadpool(path.is_file):
        raise ApiError(404, "file_not_found", f"The original of '{path.name}' is no longer where it was ingested.")
    if await run_in_threadpool(sha256_files, path) != record.content_hash:
        raise ApiError(409, "file_changed", f"'{path.name}' changed since it was ingested; ingest it again to see "
                       "the version answers cite.")
    return untrusted_file(path)
