"""Ingestion jobs from the durable job log: uploads taken by the API and folders given to `rag ingest`.

Both go through `JobRunner.run`, which records the job's progress in the job log around an `IngestJob`. An
upload's files are saved under `<upload_root>/.incoming/<job id>/` and the job recorded before the API answers 202;
the run moves them to `<upload_root>/<collection>/` (one folder per collection, so the same name in two collections
are two files) and ingests them there. `upload_root` is a folder every node mounts, so any process that reaches the
log can run any upload: the API's writer thread with the embedded log (`recover()` at server start hands back every
job that was queued or whose process died while it ran), or `rag worker` processes with the PostgreSQL queue (which
lease jobs; see rag/store/pg_jobs.py and ingest/worker.py). Running a job again is safe: files already moved are
found in place and unchanged ones are skipped by hash.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ingest.job import FileResult, IngestJob, IngestReport, doc_id_for
from rag.config import Settings
from rag.errors import ConflictError
from rag.store import IndexBusyError, open_job_log
from rag.store.shared import crash_point, utc_now
from rag.store.jobs import FINISHED, FileOutcome, Job, JobLog, LeaseLostError

logger = logging.getLogger("rag.ingest")
INCOMING = ".incoming"
STALE_INCOMING_S = 24 * 3600  # an incoming folder without a job this old was never answered 202 (shared folder)


class JobTakenError(ConflictError):
    """Another process claimed the job first (several servers recovering the same log)."""


class JobRunner:
    """Records and runs ingestion jobs, one at a time per runner, with either job log (`open_job_log`).

    >>> runner = JobRunner(Settings(index_dir="idx"))  # doctest: +SKIP
    >>> job = runner.start_path(Path("corpus"))  # doctest: +SKIP
    >>> report = runner.run(job)  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, embedder=None, log: JobLog | None = None, writer_wait_s: float = 0.0):
        self.settings = settings
        self.writer_wait_s = writer_wait_s  # how long a job waits for another writer to finish (0: fail at once)
        self.embedder = embedder  # None: IngestJob loads the configured model when a file needs embedding
        self.log = log or open_job_log(settings)

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
        """Record an upload whose files are already saved (and fsynced) in its incoming folder; if it cannot be
        recorded (the database is away), the files are removed."""
        incoming = self.incoming_dir(job_id)
        _fsync_dir(incoming)
        target = self.collection_dir(collection).resolve()
        files = [FileOutcome(name, str(target / name)) for name in filenames]
        try:
            return self.log.create(Job(job_id, files, kind="upload", spec={"filenames": filenames},
                                       collection=collection))
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise

    def start_path(self, root: Path, include=(), exclude=(), prune: bool | None = None,
                   follow_links: bool = False) -> Job:
        """Record a `rag ingest` run, or take over an interrupted one with the same arguments."""
        spec = {"root": str(Path(root).resolve()), "include": list(include), "exclude": list(exclude), "prune": prune,
                "follow_links": follow_links}
        collection = self.settings.collection
        for job in self.log.unfinished(kind="path"):
            if job.spec == spec and job.collection == collection:
                return job
        return self.log.create(Job(uuid.uuid4().hex, [], kind="path", spec=spec, collection=collection))

    def recover(self) -> list[Job]:
        """Uploads to run again (queued, or interrupted by a dead process); interrupted `rag ingest` runs are
        closed as failed (their user re-runs the command, which finishes the work), and so are uploads whose runs
        ended with their process RAG_JOB_MAX_ATTEMPTS times (something in them takes the process down: resumed
        at every start, such a job would hold up the queue behind it for ever)."""
        resumable = []
        for job in self.log.unfinished():
            if job.kind == "upload" and job.attempts < self.settings.job_max_attempts:
                resumable.append(job)
                continue
            job.status, job.finished_at = "failed", utc_now()
            if job.kind == "upload":
                job.error = (f"gave up after {job.attempts} attempts: the process running this job ended before it "
                             f"finished each time (RAG_JOB_MAX_ATTEMPTS is {self.settings.job_max_attempts})")
                for outcome in job.files:
                    if outcome.status == "pending":
                        outcome.status, outcome.error = "failed", "the job failed before this file was ingested"
            else:
                job.error = "interrupted: the `rag ingest` process ended before finishing; run it again to complete"
            self.log.save(job)
        self.remove_unrecorded_uploads()
        return resumable

    def remove_unrecorded_uploads(self, min_age_s: float = 0.0) -> None:
        """Incoming folders of requests that were never answered 202 (the server died while saving them), or of
        jobs that are over. `min_age_s`: spare younger folders (another replica may be saving an upload)."""
        incoming = self.upload_root / INCOMING
        if not incoming.exists():
            return
        for folder in incoming.iterdir():
            job = self.log.get(folder.name)
            if (job is None and time.time() - folder.stat().st_mtime >= min_age_s) or \
                    (job is not None and job.status in FINISHED):
                shutil.rmtree(folder, ignore_errors=True)

    def get(self, job_id: str, collection: str | None = None) -> Job | None:
        return self.log.get(job_id, collection)

    def prune_history(self) -> int:
        return self.log.prune(timedelta(days=self.settings.job_retention_days))

    # ------------------------------------------------------------------ running
    def run(self, job: Job, on_file: Callable[[FileResult], None] | None = None,
            on_plan: Callable[[int], None] | None = None) -> IngestReport:
        """Run a recorded job to the end; its outcome is in the log whatever happens (errors are re-raised).

        With a shared log (PostgreSQL) the job's lease is kept while it runs; a run that raised goes back to the
        queue while attempts remain, and a run whose lease another worker took stops with LeaseLostError."""
        if not self.log.claim(job):
            raise JobTakenError(f"Ingestion job {job.id} is being run by another process.")
        job.started_at = utc_now()
        try:
            with self._lease_kept(job) as lost:
                def checked(result: FileResult) -> None:
                    if lost.is_set():  # raised into IngestJob, which aborts its uncommitted writes
                        raise LeaseLostError(f"Ingestion job {job.id} was taken over by another worker.")
                    if on_file:
                        on_file(result)

                report = self._ingest(job, checked, on_plan)
            crash_point("job-ingested-before-recorded")
        except LeaseLostError:
            raise  # the job is another worker's now: nothing here is ours to record
        except BaseException as error:
            self._failed(job, error)
            raise
        job.snapshot, job.index = report.snapshot, report.index_counts
        job.status, job.error = _outcome(job, report)
        self._finish(job)
        return report

    def _ingest(self, job: Job, on_file, on_plan) -> IngestReport:
        settings = self.settings.with_overrides(collection=job.collection)
        if job.kind == "upload":
            return self._run_upload(job, settings, on_file, on_plan)
        spec = job.spec
        return self._when_writable(lambda: IngestJob(settings, self.embedder).run(
            Path(spec["root"]), spec["include"], spec["exclude"], spec["prune"], on_file=on_file, on_plan=on_plan,
            follow_links=spec.get("follow_links", False)))

    def _failed(self, job: Job, error: BaseException) -> None:
        if self.log.shared and job.kind == "upload" and not isinstance(error, Exception):
            job.attempts -= 1  # this worker is being stopped (Ctrl-C, a second SIGTERM): not the job's failure
            self.log.release(job)
            return
        job.error = f"{type(error).__name__}: {error}"
        if self.log.shared and job.kind == "upload":  # any worker may run it again
            if job.attempts < self.settings.job_max_attempts:
                self.log.release(job)
                return
            job.error = f"gave up after {job.attempts} attempts; the last: {job.error}"
        job.status = "failed"
        for outcome in job.files:
            if outcome.status == "pending":
                outcome.status, outcome.error = "failed", "the job failed before this file was ingested"
        self._finish(job)

    def _finish(self, job: Job) -> None:
        job.finished_at = utc_now()
        self.log.save(job)
        self.prune_history()

    @contextmanager
    def _lease_kept(self, job: Job) -> Iterator[threading.Event]:
        """With a shared log, extend the job's lease every third of it from a thread; the event is set when
        another worker has taken the job (this one's lease had expired)."""
        lost, done = threading.Event(), threading.Event()
        if not self.log.shared:
            yield lost
            return
        lease_s = self.settings.job_lease_s

        def beat() -> None:
            while not done.wait(lease_s / 3):
                try:
                    if not self.log.heartbeat(job, lease_s):
                        lost.set()
                        return
                except Exception as error:  # the database is away for a moment; the lease runs out if it stays so
                    logger.warning("heartbeat failed", extra={"job_id": job.id, "error": str(error)})

        thread = threading.Thread(target=beat, name=f"lease-{job.id[:8]}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()

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
                if result.status == "duplicate":  # its bytes are indexed already: the area keeps one copy
                    (target / outcome.filename).unlink(missing_ok=True)
                outcome.status, outcome.chunks, outcome.error = result.status, result.chunks, result.error
                outcome.warnings = list(result.warnings)
                # a duplicate's bytes are in the document it duplicates: the one its uploader can find and open
                outcome.doc_id = result.duplicate_of or (
                    doc_id_for(result.source, job.collection) if result.status != "failed" else None)
                self.log.save(job)
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


def _outcome(job: Job, report: IngestReport) -> tuple[str, str | None]:
    """A run that went to its end: `succeeded`, or `partial` when some files failed (each with its reason, in the
    job's files or the report) while the others were ingested."""
    failed = {result.source for result in report.failed} | {f.source for f in job.files if f.status == "failed"}
    if not failed:
        return "succeeded", None
    total = len(job.files) or sum(1 for result in report.files if result.status != "removed")
    others = "; the others were ingested" if total > len(failed) else ""
    return "partial", f"{len(failed)} of {total} files failed{others}"


def _fsync_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
