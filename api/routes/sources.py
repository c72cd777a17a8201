"""What a citation points at: the whole passage (GET /v1/chunks/{id}), the original file (GET
/v1/documents/{doc_id}/file) and a PDF's page as an image with the quoted words highlighted (GET
/v1/documents/{doc_id}/pages/{page}.png, rag/pages.py), so a reader can check an answer against its source.

Only files the index records as ingested documents are served, and only while their content still has the hash
that was ingested (otherwise the cited pages may no longer be what the answer quoted). Headers: api/files.py.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Path as PathParam, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.auth import ReadScope
from api.deps import ServiceDep
from api.errors import ApiError
from api.files import MEDIA_TYPES, UNTRUSTED_HEADERS, untrusted_file
from api.schemas import PassageOut
from api.service import Service
from ingest.load import IMAGE_SUFFIXES, LoadError, image_file_pdf
from ingest.ocr import OcrOptions, page_words, unavailable
from rag.models import sha256_files
from rag.pages import MAX_HIGHLIGHT_CHARS, RenderedPages, render_page
from rag.store.base import DocumentRecord

router = APIRouter(tags=["sources"])
DocId = Annotated[str, PathParam(max_length=64)]
MAX_PAGE_NUMBER = 100_000  # past any PDF ingestion accepts (ingest/limits.py's max_pdf_pages is a setting below it)
# Keyed by content hash: a re-ingested file never shows an old render; scope is checked before the cache is read.
_rendered = RenderedPages()


@router.get("/chunks/{chunk_id}", response_model=PassageOut, summary="The full passage a citation points at",
            responses={404: {"description": "No such chunk in the current index."}})
async def passage(chunk_id: Annotated[int, PathParam(ge=0, le=2**62)], service: ServiceDep,
                  collection: ReadScope) -> PassageOut:
    # ChunkNotFoundError (none in this collection, or replaced by a later ingestion) maps to a 404 "chunk_not_found".
    chunk = await run_in_threadpool(service.current_index.chunk, chunk_id, collection)
    return PassageOut(chunk_id=chunk_id, doc_id=chunk.doc_id, source=chunk.name, page=chunk.page,
                      page_end=chunk.page_end, heading=chunk.heading, text=chunk.text)


async def _ingested_file(doc_id: str, service: Service, collection: str) -> tuple[DocumentRecord, Path]:
    """The document's file, while it is still where it was ingested and as it was ingested."""
    record = await run_in_threadpool(service.current_index.document, doc_id, collection)  # 404 document_not_found
    path = Path(record.source)
    if not await run_in_threadpool(path.is_file):
        raise ApiError(404, "file_not_found", f"The original of '{record.name}' is no longer where it was ingested.")
    if await run_in_threadpool(sha256_files, path) != record.content_hash:
        raise ApiError(409, "file_changed", f"'{record.name}' changed since it was ingested; ingest it again to see "
                       "the version answers cite.")
    return record, path


@router.get("/documents/{doc_id}/file", summary="The original file of a document (PDF inline, text as text/plain)",
            responses={200: {"content": {media: {} for media in MEDIA_TYPES}},
                       404: {"description": "No such document, or its file is gone."},
                       409: {"description": "The file changed since it was ingested."}})
async def original_file(doc_id: DocId, service: ServiceDep, collection: ReadScope):
    _, path = await _ingested_file(doc_id, service, collection)
    return untrusted_file(path)


@router.get("/documents/{doc_id}/pages/{page}.png",
            summary="A page of a PDF or image file as PNG, with quoted words highlighted",
            responses={200: {"content": {"image/png": {}}},
                       404: {"description": "No such document or page, its file is gone, or it has no pages."},
                       409: {"description": "The file changed since it was ingested."},
                       422: {"description": "The file cannot be rendered."}})
async def page_image(doc_id: DocId, page: Annotated[int, PathParam(ge=1, le=MAX_PAGE_NUMBER)], service: ServiceDep,
                     collection: ReadScope,
                     highlight: Annotated[str, Query(max_length=MAX_HIGHLIGHT_CHARS, description=(
                         "Words to highlight: an evidence quote (a sentence, or a Markdown table row)."))] = ""):
    record, path = await _ingested_file(doc_id, service, collection)
    suffix = path.suffix.lower()
    if suffix != ".pdf" and suffix not in IMAGE_SUFFIXES:
        raise ApiError(404, "not_a_pdf",
                       f"'{record.name}' has no pages: only PDF and image files are shown as images.")
    key = (record.content_hash, page, highlight)
    png = _rendered.get(key)
    if png is None:
        png = await run_in_threadpool(_render, service, path, page, highlight, record.name)
        _rendered.put(key, png)
    return Response(png, media_type="image/png", headers=UNTRUSTED_HEADERS)


def _render(service: Service, path: Path, page: int, highlight: str, name: str) -> bytes:
    """The page as PNG; an image file is shown as the image-only PDF it was ingested as, and the words of a page
    without a text layer (a scan, an image) are read by OCR for its highlights, when OCR is on."""
    options = OcrOptions.from_settings(service.settings)
    recognise = None if unavailable(options) else partial(page_words, timeout_s=options.page_timeout_s)
    if path.suffix.lower() == ".pdf":
        return render_page(path, page, highlight, name, recognise)
    try:
        pages = image_file_pdf(path)
    except LoadError as error:
        raise ApiError(422, "page_unreadable", f"'{name}' cannot be shown: {error}.") from None
    return render_page(pages, page, highlight, name, recognise)
