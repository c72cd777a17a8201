"""Ingestion through the API: uploads saved under `<index_dir>/uploads/`, ingested by one background writer.

Jobs (and document deletions) run one at a time on a single thread, since an index has a single writer. Each job
runs `IngestJob` over the upload area restricted to its own files, so re-uploading a file of the same name replaces
that document (incremental: unchanged content is skipped). When a job commits a snapshot the service reopens the
index and swaps it in; queries keep running throughout.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import unicodedata
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ingest.load import SUPPORTED_SUFFIXES

logger = logging.getLogger("rag.api")
MAX_FILENAME = 128
MAX_JOBS_KEPT = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_filename(name: str) -> str:
    """A plain file name that cannot leave the upload folder: no directories, no hidden or special names.

    >>> sanitize_filename("../../etc/passwd")
    'passwd'
    >>> sanitize_filename("..\\\\Report (final) v2.PDF")
    'Report_final_v2.PDF'
    """
    name = unicodedata.normalize("NFKC", name or "").replace("\\", "/").split("/")[-1]
    name = _UNSAFE.sub("_", name).strip("._-") or "upload"
    # ingestion skips hidden files and globs on names, so neither a leading dot nor glob characters survive
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        return name[:MAX_FILENAME]
    suffix = suffix[:16]
    return f"{stem[:MAX_FILENAME - len(suffix) - 1]}.{suffix}".lstrip(".") or "upload"


def supported(name: str) -> bool:
    return Path(name).suffix.lower() in SUPPORTED_SUFFIXES


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class FileOutcome:
    filename: str
    source: str
    status: str = "pending"  # pending, then new | changed | unchanged | failed
    chunks: int = 0
    error: str | None = None
    doc_id: str | None = None


@dataclass
class Job:
    id: str
    files: list[FileOutcome]
    status: str = "queued"  # queued | running | succeeded | failed (failed: the job as a whole; see files too)
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    snapshot: str | None = None
    error: str | None = None
    index: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        done = sum(1 for f in self.files if f.status != "pending")
        data["progress"] = {"files_total": len(self.files), "files_done": done}
        return data


class IngestQueue:
    """Accepts uploads, runs them through `IngestJob` on one writer thread, and reopens the index after each."""

    def __init__(self, service, metrics, embedder=None):
        self.service = service
        self.metrics = metrics
        self._embedder = embedder
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")

    @property
    def uploads_dir(self) -> Path:
        return self.service.uploads_dir

    # ------------------------------------------------------------------ jobs
    def incoming_dir(self, job_id: str) -> Path:
        folder = self.uploads_dir / ".incoming" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def submit(self, job_id: str, filenames: list[str]) -> Job:
        job = Job(job_id, [FileOutcome(name, str((self.uploads_dir / name).resolve())) for name in filenames])
        with self._lock:
            self._jobs[job_id] = job
            for old in list(self._jobs)[:-MAX_JOBS_KEPT]:
                del self._jobs[old]
        self._writer.submit(self._run, job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def _ingest_embedder(self):
        # Its own model instance: the query embedder's tokenizer must not be used from two threads at once.
        if self._embedder is None:
            from rag.embed import Embedder

            settings = self.service.settings
            self._embedder = Embedder.from_settings(settings)
        return self._embedder

    def _run(self, job: Job) -> None:
        from ingest.job import IngestJob, doc_id_for

        job.status, job.started_at = "running", _now()
        incoming = self.uploads_dir / ".incoming" / job.id
        try:
            for outcome in job.files:  # into the area only now, so a queued job never changes a running one's files
                os.replace(incoming / outcome.filename, self.uploads_dir / outcome.filename)
            shutil.rmtree(incoming, ignore_errors=True)
            by_source = {outcome.source: outcome for outcome in job.files}

            def on_file(result) -> None:
                outcome = by_source.get(result.source)
                if outcome is not None:
                    outcome.status, outcome.chunks, outcome.error = result.status, result.chunks, result.error
                    outcome.doc_id = doc_id_for(result.source) if result.status != "failed" else None

            report = IngestJob(self.service.settings, self._ingest_embedder()).run(
                self.uploads_dir, include=[outcome.filename for outcome in job.files], prune=False, on_file=on_file)
            job.snapshot, job.index = report.snapshot, report.index_counts
            if report.snapshot:
                self.service.open_index()
            job.status = "succeeded"
        except Exception as error:  # the index is unchanged (IngestJob aborts its copy); say why
            job.status, job.error = "failed", f"{type(error).__name__}: {error}"
            for outcome in job.files:
                if outcome.status == "pending":
                    outcome.status, outcome.error = "failed", "the job failed before this file was ingested"
            logger.error("ingest job failed", extra={"job_id": job.id, "error": job.error})
        finally:
            job.finished_at = _now()
            self.metrics.ingest_jobs.labels(job.status).inc()
            logger.info("ingest job finished", extra={"job_id": job.id, "status": job.status,
                                                      "snapshot": job.snapshot})

    # ------------------------------------------------------------------ deletion
    def delete(self, doc_id: str) -> Future:
        """Remove one document on the writer thread (after any queued jobs). The future gives its record or None."""
        return self._writer.submit(self._delete, doc_id)

    def _delete(self, doc_id: str):
        from rag.store import Store

        current = Store.open(self.service.settings.index_dir)
        try:
            record = next((r for r in current.documents().values() if r.doc_id == doc_id), None)
            manifest = current.manifest
        finally:
            current.close()
        if record is None:
            return None
        store = Store.begin(self.service.settings.index_dir, manifest.embedding_model, manifest.dimension,
                            manifest.chunking)
        try:
            store.delete([doc_id])
            store.commit()
        except BaseException:
            store.abort()
            raise
        uploaded = Path(record.source)
        if uploaded.parent == self.uploads_dir.resolve():
            uploaded.unlink(missing_ok=True)  # or a later job over the area could bring it back
        self.service.open_index()
        return record

    def shutdown(self) -> None:
        self._writer.shutdown(wait=False, cancel_futures=True)
