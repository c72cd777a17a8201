"""Documents: upload (ingested by a background job), job progress, list and delete, each in one collection.

POST /v1/documents takes multipart `files` (one or more) and a `collection` form field, and answers 202 with a job
id at once; the files are saved in the upload folder with sanitised names and ingested in the background (by this
process's index writer, or by `rag worker`s with RAG_STORE_URL: api/jobs.py). Limits: the whole request at most
RAG_MAX_UPLOAD_MB (413), supported types only (415, nothing is accepted then). Uploading and deleting need a
`write` key; a job or document of another collection is not found.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from api.auth import COLLECTION_HELP, ReadScope, WriteScope, authorize
from api.deps import ServiceDep
from api.errors import ApiError
from api.jobs import IngestQueue, sanitize_filename, supported
from api.schemas import DeletedDocument, DocumentList, DocumentOut, JobAccepted, JobOut
from ingest.load import SUPPORTED_SUFFIXES
from rag.index import listed
from rag.types import MAX_COLLECTION_NAME, Role

router = APIRouter(tags=["documents"])
COPY_BLOCK = 1 << 20


def _queue(request: Request) -> IngestQueue:
    return request.app.state.ingest


@router.post("/documents", status_code=202, response_model=JobAccepted,
             summary="Upload documents; they are ingested in the background",
             responses={413: {"description": "Request larger than RAG_MAX_UPLOAD_MB."},
                        415: {"description": "A file type that cannot be ingested."}})
async def upload(request: Request, service: ServiceDep,
                 files: Annotated[list[UploadFile], File(description="One or more documents.")],
                 collection: Annotated[str | None, Form(max_length=MAX_COLLECTION_NAME,
                                                        description=COLLECTION_HELP)] = None
                 ) -> JobAccepted:
    collection = authorize(request, collection, Role.WRITE)
    settings = service.api_settings
    if len(files) > settings.max_upload_files:
        raise ApiError(422, "too_many_files", f"At most {settings.max_upload_files} files per request.")
    names = [sanitize_filename(upload.filename or "") for upload in files]
    unsupported = [upload.filename or name for upload, name in zip(files, names) if not supported(name)]
    if unsupported:
        raise ApiError(415, "unsupported_media_type",
                       f"Cannot ingest {', '.join(repr(n) for n in unsupported)}: supported file types are "
                       f"{', '.join(sorted(SUPPORTED_SUFFIXES))}. Nothing was uploaded.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ApiError(422, "duplicate_filename",
                       f"Several files would be stored as {', '.join(duplicates)}; rename them.")
    queue = _queue(request)
    job_id = queue.new_id()
    incoming = await run_in_threadpool(queue.incoming_dir, job_id)
    for upload, name in zip(files, names):
        target = incoming / name
        assert target.resolve().parent == incoming.resolve()  # sanitize_filename guarantees it; belt and braces
        await run_in_threadpool(_save, upload, target)
    job = await run_in_threadpool(queue.submit, job_id, names, collection)
    return JobAccepted(job_id=job.id, collection=collection, status=job.status, files=names,
                       status_url=f"/v1/jobs/{job.id}?collection={collection}")


def _save(upload: UploadFile, target) -> None:
    upload.file.seek(0)
    with open(target, "xb") as out:  # "x": never overwrite, whatever the name
        shutil.copyfileobj(upload.file, out, COPY_BLOCK)
        out.flush()
        os.fsync(out.fileno())  # on disk before the job is recorded and the 202 sent


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Progress and per-file results of an ingestion job",
            responses={404: {"description": "No such job (finished jobs are kept RAG_JOB_RETENTION_DAYS days)."}})
async def job_status(job_id: str, request: Request, collection: ReadScope) -> dict:
    job = await run_in_threadpool(_queue(request).get, job_id, collection)  # another collection's: None
    if job is None:
        raise ApiError(404, "job_not_found", f"No ingestion job '{job_id[:64]}'.")
    return job.to_dict()


@router.get("/documents", response_model=DocumentList, summary="The documents of a collection")
async def list_documents(service: ServiceDep, collection: ReadScope) -> DocumentList:
    index = service.current_index  # 503 when there is no index at all
    records = await run_in_threadpool(index.documents, collection)
    counts = await run_in_threadpool(index.counts, collection)
    return DocumentList(
        collection=collection,
        documents=[DocumentOut(**listed(record)) for record in records],
        counts=counts, snapshot=service.snapshot)


@router.delete("/documents/{doc_id}", response_model=DeletedDocument, summary="Remove a document from the index",
               responses={404: {"description": "No document with this id."}})
async def delete_document(doc_id: str, request: Request, service: ServiceDep,
                          collection: WriteScope) -> DeletedDocument:
    service.current_index  # noqa: B018  (503 when there is no index at all)
    # Errors map once (api/errors.py): IndexBusyError (`rag ingest` holds the writer lock) is a 409 "index_busy",
    # DocumentNotFoundError (none in this collection) a 404 "document_not_found".
    record = await asyncio.wrap_future(_queue(request).delete(doc_id, collection))
    return DeletedDocument(doc_id=record.doc_id, source=record.name)
