"""Ingestion jobs from the durable job log: uploads taken by the API and folders given to `rag ingest`.

Both go through `JobRunner.run`, which records the job's progress in the index's job log around an `IngestJob`.
An upload's files are saved under `<upload_root>/.incoming/<job id>/` and the job recorded before the API
answers 202; the run moves them to `<upload_root>/<collection>/` (one folder per collection, so the same name in
two collections are two files) and ingests them there. `recover()` (at server start) hands back every job that
was queued or whose process died while it ran, and running it again is safe: files already moved are found in
place and unchanged ones are skipped by hash.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ingest.job import FileResult, IngestJob, IngestReport, doc_id_for
from rag.config import Settings
from rag.errors import ConflictError
from rag.store import IndexBusyError
from rag.store.jobs import FileOutcome, Job, JobLog, utc_now

logger = logging.getLogger("rag.ingest")
INCOMING = ".incoming"


class JobTakenError(ConflictError):
    """Another process claimed the job first (several servers recovering the same log)."""


class JobRunner:
    """Records and runs ingestion jobs for one index, one at a time per process.

    >>> runner = JobRunner(Settings(index_dir="idx"))  # doctest: +SKIP
    >>> job = runner.start_path(Path("corpus"))  # doctest: +SKIP
    >>> report = runner.run(job)  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, embedder=None, log: JobLog | None = None, writer_wait_s: float = 0.0):
        self.settings = settings
        self.writer_wait_s = writer_wait_s  # how long a job waits for another writer to finish (0: fail at once)
        self.embedder = embedder  # None: IngestJob loads the configured model when a file needs embedding
        self.log = log or JobLog(settings.index_dir)

    @property
    def upload_root(self) -> Path:
        return self.settings.upload_root

    def collection_dir(self, collection: str) -> Path:
        """Where a collection's uploads are kept (the `source` of their documents)."""
        return self.upload_root / collection

    # ------------------------------------------------------------------ recording
    def incoming_dir(self, job_id: str) -> Path:
        folder = self.upload_root / INCOMING / job_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def record_upload(self, job_id: str, filenames: list[str], collection: str) -> Job:
        """Record an upload whose files are already saved (and fsynced) in its incoming folder."""
        _fsync_dir(self.incoming_dir(job_id))
        target = self.collection_dir(collection).resolve()
        files = [FileOutcome(name, str(target / name)) for name in filenames]
        return self.log.create(Job(job_id, files, kind="upload", spec={"filenames": filenames},
                                   collection=collection))

    def start_path(self, root: Path, include=(), exclude=(), prune: bool | None = None) -> Job:
        """Record a `rag ingest` run, or take over an interrupted one with the same arguments."""
        spec = {"root": str(Path(root).resolve()), "include": list(include), "exclude": list(exclude), "prune": prune}
        collection = self.settings.collection
        for job in self.log.unfinished(kind="path"):
            if job.spec == spec and job.collection == collection:
                return job
        return self.log.create(Job(uuid.uuid4().hex, [], kind="path", spec=spec, collection=collection))

    def recover(self) -> list[Job]:
        """Uploads to run again (queued, or interrupted by a dead process); interrupted `rag ingest` runs are
        closed as failed (their user re-runs the command, which finishes the work)."""
        resumable = []
        for job in self.log.unfinished():
            if job.kind == "upload":
                resumable.append(job)
                continue
            job.status, job.finished_at = "failed", utc_now()
            job.error = "interrupted: the `rag ingest` process ended before finishing; run it again to complete"
            self.log.save(job)
        self.remove_unrecorded_uploads()
        return resumable

    def remove_unrecorded_uploads(self) -> None:
        """Incoming folders of requests that were never answered 202 (the server died while saving them)."""
        incoming = self.upload_root / INCOMING
        if not incoming.exists():
            return
        for folder in incoming.iterdir():
            job = self.log.get(folder.name)
            if job is None or (job.status in ("succeeded", "failed")):
                shutil.rmtree(folder, ignore_errors=True)

    def get(self, job_id: str, collection: str | None = None) -> Job | None:
        """The job; with `collection`, only if it is one of that collection's (else None, as for an unknown id)."""
        return self.log.get(job_id, collection)

    def prune_history(self) -> int:
        return self.log.prune(timedelta(days=self.settings.job_retention_days))

    # ------------------------------------------------------------------ running
    def run(self, job: Job, on_file: Callable[[FileResult], None] | None = None,
            on_plan: Callable[[int], None] | None = None) -> IngestReport:
        """Run a recorded job to the end; its outcome is in the log whatever happens (errors are re-raised)."""
        if not self.log.claim(job):
            raise JobTakenError(f"Ingestion job {job.id} is being run by another process.")
        job.started_at, job.error = utc_now(), None
        settings = self.settings.with_overrides(collection=job.collection)
        try:
            if job.kind == "upload":
                report = self._run_upload(job, settings, on_file, on_plan)
            else:
                spec = job.spec
                report = self._when_writable(lambda: IngestJob(settings, self.embedder).run(
                    Path(spec["root"]), spec["include"], spec["exclude"], spec["prune"], on_file=on_file,
                    on_plan=on_plan))
            job.snapshot, job.index, job.status = report.snapshot, report.index_counts, "succeeded"
            return report
        except BaseException as error:
            job.status, job.error = "failed", f"{type(error).__name__}: {error}"
            for outcome in job.files:
                if outcome.status == "pending":
                    outcome.status, outcome.error = "failed", "the job failed before this file was ingested"
            raise
        finally:
            job.finished_at = utc_now()
            self.log.save(job)
            self.prune_history()

    def _run_upload(self, job: Job, settings: Settings, on_file, on_plan) -> IngestReport:
        incoming = self.upload_root / INCOMING / job.id
        target = self.collection_dir(job.collection)
        target.mkdir(parents=True, exist_ok=True)
        for outcome in job.files:  # into the area only now, so a queued job never changes a running one's files
            if (incoming / outcome.filename).exists():
                os.replace(incoming / outcome.filename, target / outcome.filename)
        _fsync_dir(target)
        shutil.rmtree(incoming, ignore_errors=True)
        by_source = {outcome.source: outcome for outcome in job.files}

        def record(result: FileResult) -> None:
            outcome = by_source.get(result.source)
            if outcome is not None:
                outcome.status, outcome.chunks, outcome.error = result.status, result.chunks, result.error
                outcome.doc_id = doc_id_for(result.source, job.collection) if result.status != "failed" else None
                self.log.save(job)
            if on_file:
                on_file(result)

        present = [outcome.filename for outcome in job.files if (target / outcome.filename).exists()]
        report = self._when_writable(lambda: IngestJob(settings, self.embedder).run(
            target, include=present, prune=False, on_file=record, on_plan=on_plan)) if present else IngestReport()
        for outcome in job.files:
            if outcome.status == "pending":
                outcome.status, outcome.error = "failed", "the uploaded file is gone (deleted before it was ingested)"
        return report


    def _when_writable(self, ingest: Callable[[], IngestReport]) -> IngestReport:
        """Run an ingest, waiting while another process (`rag ingest`, another server) holds the writer lock."""
        deadline = time.monotonic() + self.writer_wait_s
        while True:
            try:
                return ingest()
            except IndexBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def _fsync_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
