"""Ingestion through the API: uploads saved in the upload folder (RAG_UPLOADS_DIR), recorded as durable jobs.

A job is recorded in the job log (with its files already on disk) before the 202 is sent, so a restart loses
nothing. Who runs it depends on the store:
- embedded: this process, on one background writer thread (an index has a single writer); on start it runs again
  every job that was queued or interrupted (`JobRunner.recover`). Jobs and document deletions take turns on that
  thread; after each commit the service refreshes its index, and compacts it in the background when the policy asks.
- PostgreSQL (RAG_STORE_URL): `rag worker` processes, from the queue in the database; this replica only records
  the job, and any replica answers for it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import unicodedata
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ingest.load import SUPPORTED_SUFFIXES
from ingest.runner import JobRunner
from rag.store import open_job_log
from rag.store.jobs import Job

logger = logging.getLogger("rag.api")
MAX_FILENAME = 128
WRITER_WAIT_S = 3600.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_filename(name: str) -> str:
    """A plain file name that cannot leave the upload folder (no directories, no hidden or special names) and that
    keeps enough of the name it was sent with that two different names are never stored as one (the second would
    replace the first): the folders of a client's path stay in it, and a name that had to change gets a short hash
    of the original, so it cannot meet another name changed into the same.

    >>> sanitize_filename("notes.md")
    'notes.md'
    >>> sanitize_filename("a\\\\x.md"), sanitize_filename("b\\\\x.md"), sanitize_filename("a_x.md")
    ('a_x-3e12cc00.md', 'b_x-668c0418.md', 'a_x.md')
    >>> sanitize_filename("../../etc/passwd")
    'etc_passwd-3754d6cb'
    """
    original = unicodedata.normalize("NFKC", name or "")
    parts = [part for part in original.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    if len(parts) > 1 and parts[0].endswith(":"):  # a Windows drive, "C:"
        parts.pop(0)
    # ingestion skips hidden files and globs on names, so neither a leading dot nor glob characters survive
    safe = _UNSAFE.sub("_", "_".join(parts)).strip("._-") or "upload"
    stem, dot, suffix = safe.rpartition(".")
    if not dot:
        stem, suffix = safe, ""
    suffix = f".{suffix[:16]}" if suffix else ""
    tag = f"-{hashlib.sha256(original.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    if f"{stem}{suffix}" == original and len(original) <= MAX_FILENAME:
        return original
    # the end of a long name is kept: the file's own name, after its client folders
    stem = stem[-(MAX_FILENAME - len(tag) - len(suffix)):].lstrip("._-") or "upload"
    return f"{stem}{tag}{suffix}"


def supported(name: str) -> bool:
    return Path(name).suffix.lower() in SUPPORTED_SUFFIXES


class IngestQueue:
    """Accepts uploads and records them; with the embedded store, also runs them through the `JobRunner` on one
    writer thread and refreshes the index after each."""

    def __init__(self, service, metrics, embedder=None):
        self.service = service
        self.metrics = metrics
        self.runs_jobs = not service.settings.store_url  # else `rag worker` processes run them, from the database
        self._embedder = embedder
        self._runner: JobRunner | None = None
        self._runner_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-compactor")
        for job in self.runner.recover() if self.runs_jobs else ():
            logger.info("resuming ingest job", extra={"job_id": job.id, "status": job.status})
            self._writer.submit(self._run, job)

    @property
    def runner(self) -> JobRunner:
        """Opened on first use, so that a replica whose database is down still starts: the job routes answer 503
        (UnavailableError) until the database is back."""
        with self._runner_lock:
            if self._runner is None:
                log = open_job_log(self.service.settings)
                embedder = self._embedder
                if embedder is None and self.runs_jobs:  # its own instance: the query embedder's tokenizer is busy
                    from rag.embed import Embedder

                    embedder = Embedder.from_settings(self.service.settings)  # the model loads on the first upload
                # An upload waits for a `rag ingest` (or another server's job) holding the writer lock, not fail.
                self._runner = JobRunner(self.service.settings, embedder, log, writer_wait_s=WRITER_WAIT_S)
            return self._runner

    # ------------------------------------------------------------------ jobs
    def incoming_dir(self, job_id: str) -> Path:
        return self.runner.incoming_dir(job_id)

    def submit(self, job_id: str, filenames: list[str], collection: str) -> Job:
        """Record the job durably (its files are saved already), then queue it."""
        job = self.runner.record_upload(job_id, filenames, collection)
        if self.runs_jobs:
            self._writer.submit(self._run, job)
        return job

    def get(self, job_id: str, collection: str) -> Job | None:
        """The job, if it is one of `collection`'s."""
        return self.runner.get(job_id, collection)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def _run(self, job: Job) -> None:
        try:
            report = self.runner.run(job)
            if report.snapshot:
                self._committed()
        except Exception as error:  # recorded in the job log by the runner; the index is unchanged
            logger.error("ingest job failed", extra={"job_id": job.id, "error": f"{type(error).__name__}: {error}"})
        finally:
            self.metrics.ingest_jobs.labels(job.status).inc()
            logger.info("ingest job finished", extra={"job_id": job.id, "status": job.status,
                                                      "snapshot": job.snapshot})

    def _committed(self) -> None:
        self.service.index_changed()
        if self.service.index is not None:
            self._compactor.submit(self._compact)

    def _compact(self) -> None:
        from rag.store import IndexBusyError

        try:
            info = self.service.index.compact(full=False)
        except IndexBusyError:  # another process compacts already
            return
        except Exception as error:  # the index is unchanged; the next commit tries again
            logger.error("compaction failed", extra={"error": f"{type(error).__name__}: {error}"})
            return
        if info is not None:
            logger.info("index compacted", extra={"segments": info.segments_after, "seconds": round(info.seconds, 2),
                                                  "tombstones_dropped": info.tombstones_dropped})

    # ------------------------------------------------------------------ deletion
    def delete(self, doc_id: str, collection: str) -> Future:
        """Remove one document of `collection` on the writer thread (after any queued jobs). The future gives its
        record."""
        return self._writer.submit(self._delete, doc_id, collection)

    def _delete(self, doc_id: str, collection: str):
        record = self.service.index.delete(doc_id, collection)  # DocumentNotFoundError when it has none
        uploaded = Path(record.source)
        if uploaded.parent == self.runner.collection_dir(record.collection).resolve():
            uploaded.unlink(missing_ok=True)  # or a later job over the area could bring it back
        self._committed()
        return record

    def shutdown(self) -> None:
        # Queued jobs stay queued in the job log and run at the next start.
        self._writer.shutdown(wait=False, cancel_futures=True)
        self._compactor.shutdown(wait=False, cancel_futures=True)
