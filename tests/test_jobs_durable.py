"""Accepted work is never lost: a 202 upload survives SIGKILL of a real server process and is ingested after the
restart, GET /v1/jobs/{id} answers across restarts, and `rag ingest` runs are recorded as jobs too."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rag.store import Store
from rag.store.jobs import JobLog
from rag.types import ALL_COLLECTIONS
from tests.conftest import free_port
from tests.test_api import api_base_index  # noqa: F401  (fixture re-exported)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _start_server(index: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAG_API_KEYS": "", "RAG_INDEX_POLL_S": "0.5",
           "RAG_PARSE_WORKERS": "1"}
    env.pop("RAG_API_KEYS_FILE", None)
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--index", str(index), "--port", str(port)],
                               env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def _wait_job(base: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{base}/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        if response.json()["status"] in ("succeeded", "failed"):
            return response.json()
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.3)


def test_accepted_uploads_survive_sigkill_of_the_server(tmp_path, api_base_index):  # noqa: F811
    index = tmp_path / "index"
    shutil.copytree(api_base_index, index)
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    server = _start_server(index, port, log)
    try:
        first = httpx.post(f"{base}/v1/documents", timeout=60, files={"files": (
            "numbat.md", b"# Numbat limits\n\nThe numbat-limit setting caps retries at seven per minute.\n")})
        second = httpx.post(f"{base}/v1/documents", timeout=60, files={"files": (
            "bilby.md", b"# Bilby pools\n\nThe bilby-pool option keeps twelve idle connections warm.\n")})
        assert first.status_code == second.status_code == 202
    finally:
        server.send_signal(signal.SIGKILL)  # at once: the second job is still queued behind the first
        server.wait(30)
    jobs = [first.json()["job_id"], second.json()["job_id"]]
    recorded = JobLog(index)
    assert all(recorded.get(job_id) is not None for job_id in jobs)  # on disk before the 202 was sent
    assert recorded.get(jobs[1]).status in ("queued", "running")
    recorded.close()

    server = _start_server(index, free_port(), log)
    base = f"http://127.0.0.1:{server.args[-1]}"
    try:
        for job_id in jobs:  # answered by the new process, and finished by it
            job = _wait_job(base, job_id)
            assert job["status"] == "succeeded" and job["files"][0]["status"] == "new", job
        assert httpx.get(f"{base}/v1/jobs/{'0' * 32}").status_code == 404
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    store = Store.open(index)
    sources = [Path(record.source).name for record in store.documents(collection=ALL_COLLECTIONS).values()]
    assert sorted(name for name in sources if name in ("numbat.md", "bilby.md")) == ["bilby.md", "numbat.md"]
    counts = store.counts(collection=ALL_COLLECTIONS)
    assert counts["chunks"] == counts["vectors"] == sum(r.chunk_count for r in store.documents(collection=ALL_COLLECTIONS).values())
    assert not list((index / "uploads" / ".incoming").glob("*/*"))  # every accepted file reached the upload area


def test_cli_ingest_is_a_recorded_job(tmp_path):
    docs, index = tmp_path / "docs", tmp_path / "index"
    docs.mkdir()
    (docs / "note.txt").write_text("The wallaby flag turns on verbose logging.\n")
    result = subprocess.run([sys.executable, "-m", "cli", "ingest", str(docs), "--index", str(index), "--json"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    log = JobLog(index)
    (job_id,) = [row[0] for row in log.db.execute("SELECT id FROM jobs WHERE kind = 'path'")]
    job = log.get(job_id)
    assert job.status == "succeeded" and job.index["documents"] == 1 and job.spec["root"] == str(docs.resolve())
