"""`rag worker`: run upload jobs from the PostgreSQL queue (see ingest/worker.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import app, settings_from


@app.command()
def worker(
    max_jobs: Annotated[Optional[int], typer.Option("--max-jobs", min=1, help="Exit after running this many jobs.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit when the queue is empty instead of waiting for jobs.")] = False,
    lease_s: Annotated[Optional[float], typer.Option("--lease-s", help="Lease on a job, renewed while it runs; another worker retries a job whose lease expired (env: RAG_JOB_LEASE_S; default 60).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Take ingestion jobs from the queue in PostgreSQL (RAG_STORE_URL) and run them; run as many as you like, on
    any machines that mount the upload folder (RAG_UPLOADS_DIR). Logs JSON lines. SIGTERM finishes the job in hand
    and exits; a second SIGTERM gives the job back to the queue at once."""
    from api.observability import configure_logging
    from ingest.worker import Worker

    configure_logging(log_level.upper())
    queue_worker = Worker(settings_from(job_lease_s=lease_s))
    queue_worker.handle_signals()
    queue_worker.run(max_jobs=max_jobs, drain=once)
