"""The durable log of ingestion jobs, kept in the index's own SQLite database (so it survives any restart).

An upload is recorded here (with its files, already on disk) before the API answers 202; a server that starts
finds the jobs that were queued or whose process died mid-run and runs them again (ingestion is idempotent by
content hash, so a re-run never duplicates). `rag ingest` records its runs here too.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

from rag.errors import ConflictError
from rag.store.base import DEFAULT_COLLECTION
from rag.store.shared import utc_now
from rag.store.sqlite_schema import add_columns, connect, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,               -- 'upload' (API) or 'path' (rag ingest)
    status TEXT NOT NULL,             -- queued | running | succeeded | partial | failed
    spec TEXT NOT NULL,               -- JSON: what to ingest
    owner TEXT,                       -- 'pid:create_time' of the process running it
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    snapshot TEXT,
    error TEXT,
    index_counts TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS job_files (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    filename TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    chunks INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    doc_id TEXT,
    PRIMARY KEY (job_id, position)
);
"""
# Columns added after the first release, to new logs and to those of older versions alike, at open.
ADDED_COLUMNS = {"jobs": {"collection": f"TEXT NOT NULL DEFAULT '{DEFAULT_COLLECTION}'",
                          "attempts": "INTEGER NOT NULL DEFAULT 0"},
                 "job_files": {"warnings": "TEXT NOT NULL DEFAULT '[]'"}}  # JSON list
# partial: the run went to its end, and some of its files failed (each says why) while the others were ingested.
FINISHED = ("succeeded", "partial", "failed")
_FINISHED_SQL = ", ".join(f"'{status}'" for status in FINISHED)


class LeaseLostError(ConflictError):
    """Another worker took the job over (this one's lease expired): this one must stop working on it."""

    code = "lease_lost"


def this_process() -> str:
    """An owner token that a reused pid cannot impersonate: pid plus the process's start time."""
    return f"{os.getpid()}:{psutil.Process().create_time():.2f}"


def is_alive(owner: str | None) -> bool:
    if not owner:
        return False
    pid, _, created = owner.partition(":")
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == created
    except (psutil.Error, ValueError):
        return False


@dataclass
class FileOutcome:
    filename: str
    source: str
    status: str = "pending"  # pending, then new | changed | unchanged | failed
    chunks: int = 0
    error: str | None = None
    doc_id: str | None = None
    warnings: list[str] = field(default_factory=list)  # see ingest.job.FileResult


@dataclass
class Job:
    id: str
    files: list[FileOutcome]
    kind: str = "upload"
    spec: dict = field(default_factory=dict)
    status: str = "queued"  # queued | running, then one of FINISHED (failed: the job as a whole; see files too)
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    snapshot: str | None = None
    error: str | None = None
    index: dict = field(default_factory=dict)
    owner: str | None = None
    collection: str = DEFAULT_COLLECTION
    attempts: int = 0  # runs started (a worker's lease or a claim); see PostgresJobLog for retries

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["owner"], data["spec"]
        for outcome in data["files"]:  # as users see it (DocumentRecord.name), not where the server keeps it
            outcome["source"] = outcome["filename"]
            outcome["duplicate_of"] = outcome["doc_id"] if outcome["status"] == "duplicate" else None
        done = sum(1 for f in self.files if f.status != "pending")
        data["progress"] = {"files_total": len(self.files), "files_done": done}
        return data


class JobLog:
    """Jobs and their per-file outcomes, in `<index_dir>/store.sqlite`. Safe to use from several threads."""

    shared = False  # jobs are run by the process that runs them (a server, `rag ingest`): no leases, no retries

    def __init__(self, index_dir: Path):
        index_dir.mkdir(parents=True, exist_ok=True)
        self.db = connect(index_dir)
        self.db.executescript(SCHEMA)
        add_columns(self.db, ADDED_COLUMNS)
        self._lock = threading.Lock()

    def create(self, job: Job) -> Job:
        """Record a job durably (the commit is fsynced before this returns)."""
        with self._lock:
            with write_transaction(self.db):
                self.db.execute(
                    "INSERT INTO jobs (id, kind, status, spec, owner, created_at, collection, attempts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (job.id, job.kind, job.status, json.dumps(job.spec), job.owner,
                                                        job.created_at, job.collection, job.attempts))
                self.db.executemany(
                    "INSERT INTO job_files (job_id, position, filename, source) VALUES (?, ?, ?, ?)",
                    [(job.id, position, f.filename, f.source) for position, f in enumerate(job.files)])
        return job

    def save(self, job: Job) -> None:
        """Write the job's status and its files' outcomes."""
        with self._lock:
            with write_transaction(self.db):
                self.db.execute(
                    "UPDATE jobs SET status = ?, owner = ?, started_at = ?, finished_at = ?, snapshot = ?, error = ?,"
                    " index_counts = ?, spec = ? WHERE id = ?",
                    (job.status, job.owner, job.started_at, job.finished_at, job.snapshot, job.error,
                     json.dumps(job.index), json.dumps(job.spec), job.id))
                self.db.executemany(
                    "UPDATE job_files SET status = ?, chunks = ?, error = ?, doc_id = ?, warnings = ? "
                    "WHERE job_id = ? AND position = ?",
                    [(f.status, f.chunks, f.error, f.doc_id, json.dumps(f.warnings), job.id, position)
                     for position, f in enumerate(job.files)])

    def claim(self, job: Job) -> bool:
        """Make this process the job's owner, unless another process took it since `job` was read."""
        owner = this_process()
        with self._lock:
            claimed = self.db.execute(
                "UPDATE jobs SET status = 'running', owner = ?, started_at = ?, attempts = attempts + 1 WHERE id = ? "
                "AND status IN ('queued', 'running') AND COALESCE(owner, '') = ?",
                (owner, utc_now(), job.id, job.owner or "")).rowcount == 1
        if claimed:
            job.status, job.owner, job.attempts = "running", owner, job.attempts + 1
        return claimed

    def get(self, job_id: str, collection: str | None = None) -> Job | None:
        """The job, or None; with `collection`, only a job of that collection (a scoped caller's)."""
        with self._lock:
            row = self.db.execute("SELECT id, kind, status, spec, owner, created_at, started_at, finished_at, snapshot,"
                                  " error, index_counts, collection, attempts FROM jobs WHERE id = ? "
                                  "AND (? IS NULL OR collection = ?)", (job_id, collection, collection)).fetchone()
            if row is None:
                return None
            files = [FileOutcome(*f, json.loads(warnings)) for *f, warnings in self.db.execute(
                "SELECT filename, source, status, chunks, error, doc_id, warnings FROM job_files WHERE job_id = ? "
                "ORDER BY position", (job_id,))]
        (id_, kind, status, spec, owner, created, started, finished, snapshot, error, counts, collection,
         attempts) = row
        return Job(id_, files, kind, json.loads(spec), status, created, started, finished, snapshot, error,
                   json.loads(counts), owner, collection, attempts)

    def unfinished(self, kind: str | None = None) -> list[Job]:
        """Queued jobs and running ones whose process is gone, oldest first."""
        with self._lock:
            rows = self.db.execute("SELECT id, status, owner, kind FROM jobs WHERE status IN ('queued', 'running') "
                                   "ORDER BY created_at, rowid").fetchall()
        return [self.get(id_) for id_, status, owner, job_kind in rows
                if (kind is None or job_kind == kind) and (status == "queued" or not is_alive(owner))]

    def prune(self, max_age: timedelta) -> int:
        """Forget finished jobs older than `max_age`; returns how many."""
        cutoff = (datetime.now(timezone.utc) - max_age).isoformat(timespec="seconds")
        with self._lock:
            with write_transaction(self.db):
                finished = f"SELECT id FROM jobs WHERE status IN ({_FINISHED_SQL}) AND finished_at < ?"
                ids = [row[0] for row in self.db.execute(finished, (cutoff,))]
                self.db.executemany("DELETE FROM job_files WHERE job_id = ?", [(id_,) for id_ in ids])
                self.db.executemany("DELETE FROM jobs WHERE id = ?", [(id_,) for id_ in ids])
        return len(ids)

    def close(self) -> None:
        self.db.close()
