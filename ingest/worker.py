"""`rag worker`: runs upload jobs from the shared PostgreSQL queue, on any machine that mounts the upload folder.

The loop leases the oldest job (rag/store/pg_jobs.py), runs it through the `JobRunner` (which keeps the lease
alive from a thread and records every outcome), and leases the next. The embedding model loads once per worker.
While the database is away, an idle worker waits for it (a worker that cannot reach it at start exits with code
3). On SIGTERM or SIGINT the worker finishes the job in hand and exits; a second signal stops the job at once and
gives it back to the queue for another worker. A worker that dies without either (kill -9, a lost machine) leaves
a lease that expires after RAG_JOB_LEASE_S, and another worker runs the job again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from ingest.runner import STALE_INCOMING_S, JobRunner
from rag.config import Settings
from rag.errors import UnavailableError, UserError
from rag.store import open_job_log
from rag.store.jobs import Job

logger = logging.getLogger("rag.worker")
IDLE_POLL_S = 1.0  # how often an idle worker asks for a job
UNAVAILABLE_RETRY_S = 5.0  # how often it tries again while the database is away


class Worker:
    """Leases and runs jobs until stopped, out of jobs (`drain`), or `max_jobs` ran.

    >>> Worker(Settings(store_url="postgresql://rag@db/rag")).run(max_jobs=1)  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, embedder=None):
        self.settings = settings
        self.log = open_job_log(settings)
        if not self.log.shared:
            self.log.close()
            raise UserError("`rag worker` takes jobs from the PostgreSQL queue: set RAG_STORE_URL "
                            "(postgresql://...). With the embedded store, `rag serve` runs uploads itself.")
        if embedder is None:
            from rag.embed import Embedder

            embedder = Embedder.from_settings(settings)
            embedder.encode(["warm up"])  # load the model now (torch or ONNX, as `encode` uses), once for every job
        self.runner = JobRunner(settings, embedder, self.log)
        self.name = self.log.owner
        self.stopping = threading.Event()

    def run(self, max_jobs: int | None = None, drain: bool = False) -> int:
        """Run jobs; returns how many ran. `drain`: exit when the queue is empty instead of waiting."""
        logger.info("worker started", extra={"worker": self.name, "lease_s": self.settings.job_lease_s})
        self.runner.remove_unrecorded_uploads(min_age_s=STALE_INCOMING_S)
        ran = 0
        try:
            while not self.stopping.is_set() and (max_jobs is None or ran < max_jobs):
                try:
                    job = self.log.lease(self.name, self.settings.job_lease_s)
                except UnavailableError as error:  # the database went away: wait for it, as a service should
                    logger.warning("job queue unavailable", extra={"error": str(error)})
                    self.stopping.wait(UNAVAILABLE_RETRY_S)
                    continue
                if job is None:
                    if drain:
                        break
                    self.stopping.wait(IDLE_POLL_S)
                    continue
                self._run(job)
                ran += 1
        finally:
            logger.info("worker stopped", extra={"worker": self.name, "jobs": ran})
            self.log.close()
        return ran

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        logger.info("job leased", extra={"job_id": job.id, "attempt": job.attempts, "collection": job.collection,
                                         "files": len(job.files)})
        try:
            report = self.runner.run(job)
        except KeyboardInterrupt:  # a second signal: the runner gave the job back to the queue
            logger.info("job given back to the queue", extra={"job_id": job.id})
            raise
        except Exception as error:  # recorded in the job log by the runner (queued again, or failed)
            logger.error("job did not finish", extra={"job_id": job.id, "status": job.status,
                                                      "error": f"{type(error).__name__}: {error}"})
            return
        logger.info("job finished", extra={"job_id": job.id, "status": job.status, "snapshot": job.snapshot,
                                           "chunks_added": report.chunks_added,
                                           "seconds": round(time.perf_counter() - started, 2)})

    def stop(self) -> None:
        """Finish the job in hand, then exit."""
        self.stopping.set()

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT: the first stops after the current job, the second gives the job back at once (main
        thread only)."""
        def on_signal(signum, frame) -> None:
            if self.stopping.is_set():
                raise KeyboardInterrupt  # into the running job: the runner releases it to the queue
            logger.info("stopping after the current job", extra={"signal": signal.Signals(signum).name})
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
