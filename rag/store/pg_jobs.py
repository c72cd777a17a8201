"""The ingestion job queue in PostgreSQL: the same job log as the embedded one, taken by `rag worker` processes on
any number of machines, and read by every API replica.

A worker *leases* a job: one statement takes the oldest queued job (or a running one whose lease expired: its
worker died or hung) with `SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent workers never wait on each other and
never take the same job; it stamps the worker's name, `lease_until` and one more attempt. While it runs, the worker
extends the lease (`heartbeat`); a worker that finds its lease taken stops, and every write it makes is guarded by
`owner = <its name>`, so a worker that lost its lease cannot overwrite the new owner's record. A job whose run
raised goes back to the queue until `job_max_attempts` attempts were made, then fails with the last error; a job
whose worker vanished fails the same way once its last lease expires. Running a job twice is safe: ingestion skips
unchanged files by content hash, and the store serialises writers of one document, which is stored once.

Why this rather than a Postgres queue library (procrastinate and pgqueuer are the well-kept ones): the job row is
also what GET /v1/jobs/{id} shows, with per-file progress and outcomes that the run writes as it goes. A library
keeps its own job table, schema migrations and (for both) an asyncio worker loop around our synchronous, CPU-bound
ingestion; we would mirror state between two tables and two migration histories for the part we actually need,
which is one UPDATE with SKIP LOCKED, a lease column and an attempt counter. The tables are steps of the store's
own versioned migrations (`rag.store.pg_schema.MIGRATIONS`).
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta, timezone

from psycopg.types.json import Jsonb

from rag.config import Settings
from rag.store.jobs import FINISHED, FileOutcome, Job, LeaseLostError
from rag.store.pg_schema import Database

JOB_COLUMNS = ("id, kind, collection, status, spec, owner, attempts, created_at, started_at, finished_at, snapshot, "
               "error, index_counts")
# Both take the oldest job first; `kind = 'upload'`: a `rag ingest` run names a path on its own machine.
AVAILABLE = ("kind = 'upload' AND (status = 'queued' OR (status = 'running' AND lease_until < now()))")
LOST = "'the worker ' || owner || ' stopped before finishing (its lease expired)'"
LEASE = f"""
UPDATE jobs SET status = 'running', owner = %(worker)s, attempts = attempts + 1, started_at = now(),
       lease_until = now() + make_interval(secs => %(lease_s)s),
       error = CASE WHEN status = 'running' THEN {LOST} ELSE error END
 WHERE id = (SELECT id FROM jobs WHERE {AVAILABLE} AND attempts < %(max_attempts)s
             ORDER BY created_at, id FOR UPDATE SKIP LOCKED LIMIT 1)
RETURNING id"""
# Jobs whose last allowed attempt's worker vanished: failed, with the reason, files still pending marked failed.
GIVE_UP = f"""
WITH exhausted AS (
    UPDATE jobs SET status = 'failed', finished_at = now(), lease_until = NULL,
           error = 'gave up after ' || attempts || ' attempts; the last: ' || {LOST}
     WHERE id IN (SELECT id FROM jobs WHERE {AVAILABLE} AND attempts >= %(max_attempts)s
                  FOR UPDATE SKIP LOCKED)
    RETURNING id)
UPDATE job_files SET status = 'failed', error = 'the job failed before this file was ingested'
 WHERE job_id IN (SELECT id FROM exhausted) AND status = 'pending'"""


def worker_name() -> str:
    """Unique across machines and restarts: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class PostgresJobLog:
    """Jobs and their per-file outcomes in PostgreSQL. Safe to use from several threads (a connection pool).

    >>> log = PostgresJobLog.from_settings(Settings(store_url="postgresql://rag@db/rag"))  # doctest: +SKIP
    >>> job = log.lease(log.owner, lease_s=60)  # doctest: +SKIP  (None when there is nothing to do)

    A `JobRunner` over this log claims jobs as `log.owner`: a worker leases under that name, so that the run it
    hands to the runner is the one it leased (claiming under another name would count one more attempt).
    """

    shared = True  # jobs are run by workers anywhere: leases are kept and a failed run goes back to the queue

    def __init__(self, database: Database, max_attempts: int, lease_s: float, owner: str | None = None):
        self.database = database
        self.max_attempts = max_attempts
        self.lease_s = lease_s  # of a job claimed by `claim` (a `rag ingest` run); workers pass theirs to `lease`
        self.owner = owner or worker_name()

    @classmethod
    def from_settings(cls, settings: Settings, owner: str | None = None) -> PostgresJobLog:
        """The queue in `settings.store_url`'s database (the process's shared pool; migrated when opened)."""
        return cls(Database.from_settings(settings.store_url, settings), settings.job_max_attempts,
                   settings.job_lease_s, owner)

    # ------------------------------------------------------------------ the methods of the embedded log
    def create(self, job: Job) -> Job:
        with self.database.connection() as db, db.transaction():
            db.execute("INSERT INTO jobs (id, kind, collection, status, spec, owner, attempts, created_at) "
                       "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                       (job.id, job.kind, job.collection, job.status, Jsonb(job.spec), job.owner, job.attempts,
                        job.created_at))
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO job_files (job_id, position, filename, source) VALUES (%s, %s, %s, %s)",
                    [(job.id, position, f.filename, f.source) for position, f in enumerate(job.files)])
        return job

    def save(self, job: Job) -> None:
        """Write the job's status and its files' outcomes, if `job.owner` still holds it (else LeaseLostError)."""
        with self.database.connection() as db, db.transaction():
            updated = db.execute(
                "UPDATE jobs SET status = %s, started_at = %s, finished_at = %s, snapshot = %s, error = %s, "
                "index_counts = %s, spec = %s, lease_until = CASE WHEN %s THEN NULL ELSE lease_until END "
                "WHERE id = %s AND owner IS NOT DISTINCT FROM %s",
                (job.status, job.started_at, job.finished_at, job.snapshot, job.error, Jsonb(job.index),
                 Jsonb(job.spec), job.status in FINISHED, job.id, job.owner)).rowcount
            if not updated:
                raise LeaseLostError(f"Ingestion job {job.id} was taken over by another worker.")
            with db.cursor() as cursor:
                cursor.executemany(
                    "UPDATE job_files SET status = %s, chunks = %s, error = %s, doc_id = %s, warnings = %s "
                    "WHERE job_id = %s AND position = %s",
                    [(f.status, f.chunks, f.error, f.doc_id, Jsonb(f.warnings), job.id, position)
                     for position, f in enumerate(job.files)])

    def claim(self, job: Job) -> bool:
        """Make this log's owner the job's, unless another took it since `job` was read (for `rag ingest` runs and
        for a job this owner leased already, which it keeps)."""
        with self.database.connection() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'running', owner = %(me)s, started_at = now(), "
                "       attempts = attempts + (owner IS DISTINCT FROM %(me)s)::int, "
                "       lease_until = now() + make_interval(secs => %(lease_s)s) "
                " WHERE id = %(id)s AND status IN ('queued', 'running') AND owner IS NOT DISTINCT FROM %(seen)s "
                "RETURNING attempts",
                {"me": self.owner, "lease_s": self.lease_s, "id": job.id, "seen": job.owner}).fetchone()
        if row is None:
            return False
        job.status, job.owner, job.attempts = "running", self.owner, row[0]
        return True

    def get(self, job_id: str, collection: str | None = None) -> Job | None:
        """The job, or None; with `collection`, only a job of that collection (a scoped caller's)."""
        with self.database.connection() as db:
            row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs "
                             "WHERE id = %(id)s AND (%(scope)s::text IS NULL OR collection = %(scope)s)",
                             {"id": job_id, "scope": collection}).fetchone()
            if row is None:
                return None
            files = db.execute("SELECT filename, source, status, chunks, error, doc_id, warnings FROM job_files "
                               "WHERE job_id = %s ORDER BY position", (job_id,)).fetchall()
        return _job(row, files)

    def unfinished(self, kind: str | None = None) -> list[Job]:
        """Queued jobs and running ones whose lease expired, oldest first."""
        with self.database.connection() as db:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM jobs WHERE (status = 'queued' OR (status = 'running' AND lease_until < now())) "
                "AND (%s::text IS NULL OR kind = %s) ORDER BY created_at, id", (kind, kind))]
        return [job for job in map(self.get, ids) if job is not None]

    def prune(self, max_age: timedelta) -> int:
        """Forget finished jobs older than `max_age`; returns how many."""
        with self.database.connection() as db:
            return db.execute("DELETE FROM jobs WHERE status = ANY(%s) AND finished_at < now() - %s",
                              (list(FINISHED), max_age)).rowcount

    def close(self) -> None:
        self.database.close()

    # ------------------------------------------------------------------ for workers: leases and retries
    def lease(self, worker: str, lease_s: float) -> Job | None:
        """Take the next job to run, for `lease_s` seconds (extend with `heartbeat`); None when there is none.
        Jobs out of attempts are failed on the way."""
        with self.database.connection() as db:
            with db.transaction():
                db.execute(GIVE_UP, {"max_attempts": self.max_attempts})
            row = db.execute(LEASE, {"worker": worker, "lease_s": lease_s, "max_attempts": self.max_attempts}
                             ).fetchone()
        return self.get(row[0]) if row else None

    def release(self, job: Job) -> None:
        """Give a job this owner holds back to the queue (its `error` and `attempts` as they are in `job`)."""
        with self.database.connection() as db:
            updated = db.execute(
                "UPDATE jobs SET status = 'queued', owner = NULL, lease_until = NULL, error = %s, attempts = %s "
                "WHERE id = %s AND owner = %s AND status = 'running'",
                (job.error, job.attempts, job.id, job.owner)).rowcount
        if not updated:
            raise LeaseLostError(f"Ingestion job {job.id} was taken over by another worker.")
        job.status, job.owner = "queued", None

    def heartbeat(self, job: Job, lease_s: float) -> bool:
        """Extend the job's lease; False when its owner lost it (the worker must stop)."""
        with self.database.connection() as db:
            return db.execute("UPDATE jobs SET lease_until = now() + make_interval(secs => %s) "
                              "WHERE id = %s AND owner = %s AND status = 'running'",
                              (lease_s, job.id, job.owner)).rowcount == 1


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat(timespec="seconds") if value is not None else None


def _job(row: tuple, files: list[tuple]) -> Job:
    (id_, kind, collection, status, spec, owner, attempts, created, started, finished, snapshot, error,
     counts) = row
    return Job(id_, [FileOutcome(*f) for f in files], kind, spec, status, _iso(created), _iso(started),
               _iso(finished), snapshot, error, counts, owner, collection=collection, attempts=attempts)
