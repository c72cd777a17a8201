"""Load test of the HTTP API: N concurrent clients against /v1/search and /v1/ask on a local uvicorn server.

    .venv/bin/python bench/load.py [--clients 50] [--duration 60] [--ask-clients 5] [--max-new-tokens 8]
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key KEY     # an already running server

Without --url it ingests corpus/httpx into a temporary index (or uses --index), starts
`uvicorn --factory api.app:create_app` on a free loopback port in a separate process, waits for /readyz, runs
the clients, and stops the server. Each client is a closed loop (send, wait for the reply, send again) until the
duration ends; `--ask-clients` of them ask questions (small max_new_tokens), the rest search. Reports per route:
throughput, p50/p95/p99 latency of successful requests, and errors by status, with 503 back-pressure apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_flags, markdown_table, percentile  # noqa: E402

QUERIES = [
    "How do I set a timeout on a client?", "How do I disable timeouts?", "What exceptions can HTTPX raise?",
    "How do I send a JSON body?", "How do I use HTTP/2?", "How do I set a proxy?", "How do I stream a response?",
    "How do I follow redirects?", "What is the default connect timeout?", "How do I upload files?",
    "How do I use an async client?", "How do I set custom headers?", "How do I send cookies?",
    "How do I authenticate with basic auth?", "How do I configure SSL certificates?", "What are event hooks?",
]
BENCH_KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_index(docs: Path, index: Path) -> None:
    from ingest.job import IngestJob
    from rag.config import Settings

    started = time.perf_counter()
    report = IngestJob(Settings(index_dir=index)).run(docs)
    print(f"ingested {report.index_counts} from {docs} in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def start_server(index: Path, port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "RAG_INDEX_DIR": str(index), "RAG_API_KEYS": BENCH_KEY, **env_extra}
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    sys.exit(f"{url} did not become ready in {timeout:.0f} s")


async def client_loop(http: httpx.AsyncClient, route: str, number: int, deadline: float, max_new_tokens: int,
                      records: list) -> None:
    turn = number
    while time.monotonic() < deadline:
        query = QUERIES[turn % len(QUERIES)]
        turn += 7
        body = ({"query": query, "k": 5} if route == "search"
                else {"question": query, "k": 3, "max_new_tokens": max_new_tokens})
        started = time.perf_counter()
        try:
            response = await http.post(f"/v1/{route}", json=body)
            status = str(response.status_code)
            if response.status_code == 503:
                # back-pressure: honour Retry-After (capped), as a well-behaved client would
                retry_after = float(response.headers.get("Retry-After", "1"))
                records.append((route, status, time.perf_counter() - started))
                await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))
                continue
        except httpx.TimeoutException:
            status = "timeout"
        except httpx.TransportError as error:
            status = type(error).__name__
        records.append((route, status, time.perf_counter() - started))


async def run_clients(url: str, api_key: str, clients: int, ask_clients: int, duration: float,
                      max_new_tokens: int, timeout: float) -> tuple[list, float]:
    records: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                                 timeout=timeout) as http:
        await http.post("/v1/search", json={"query": "warm up"})  # first-request costs out of the numbers
        started = time.monotonic()
        deadline = started + duration
        await asyncio.gather(*(client_loop(http, "ask" if number < ask_clients else "search", number, deadline,
                                           max_new_tokens, records) for number in range(clients)))
        elapsed = time.monotonic() - started
    return records, elapsed


def summarise(records: list, elapsed: float) -> tuple[list[list[object]], dict]:
    by_route: dict[str, list] = defaultdict(list)
    for route, status, seconds in records:
        by_route[route].append((status, seconds))
    rows, summary = [], {}
    for route in ("search", "ask"):
        results = by_route.get(route, [])
        if not results:
            continue
        ok = [seconds * 1000 for status, seconds in results if status == "200"]
        statuses = Counter(status for status, _ in results)
        errors = {status: n for status, n in statuses.items() if status not in ("200", "503")}
        entry = {"requests": len(results), "ok": len(ok), "throughput_rps": round(len(ok) / elapsed, 1),
                 "p50_ms": round(percentile(ok, 50), 1), "p95_ms": round(percentile(ok, 95), 1),
                 "p99_ms": round(percentile(ok, 99), 1), "rejected_503": statuses.get("503", 0), "errors": errors}
        summary[route] = entry
        rows.append([f"/v1/{route}", entry["requests"], entry["ok"], entry["throughput_rps"], entry["p50_ms"],
                     entry["p95_ms"], entry["p99_ms"], entry["rejected_503"],
                     ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"])
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="Concurrent clients (default 50).")
    parser.add_argument("--ask-clients", type=int, default=5, help="How many of them call /v1/ask (default 5).")
    parser.add_argument("--duration", type=float, default=60, help="Seconds of load (default 60).")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60, help="Per-request timeout in seconds.")
    parser.add_argument("--url", help="Use this running server instead of starting one.")
    parser.add_argument("--api-key", default=BENCH_KEY)
    parser.add_argument("--index", type=Path, help="Index to serve (default: corpus/httpx ingested into a temp dir).")
    parser.add_argument("--docs", type=Path, default=ROOT / "corpus" / "httpx")
    parser.add_argument("--max-queue", type=int, default=16, help="RAG_MAX_QUEUE of the started server.")
    parser.add_argument("--max-concurrent-generations", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        index = args.index or Path(tempfile.mkdtemp(prefix="bench-load-")) / "index"
        if not (index / "CURRENT").exists():
            build_index(args.docs, index)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(index, port, {"RAG_MAX_QUEUE": str(args.max_queue),
                                             "RAG_MAX_CONCURRENT_GENERATIONS": str(args.max_concurrent_generations)})
    try:
        wait_ready(url, process)
        records, elapsed = asyncio.run(run_clients(url, args.api_key, args.clients, min(args.ask_clients, args.clients),
                                                   args.duration, args.max_new_tokens, args.timeout))
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    rows, summary = summarise(records, elapsed)
    if args.json:
        print(json.dumps({"clients": args.clients, "ask_clients": args.ask_clients, "seconds": round(elapsed, 1),
                          "routes": summary}, indent=2))
        return
    print(f"{args.clients} clients ({args.ask_clients} asking, max_new_tokens={args.max_new_tokens}) for "
          f"{elapsed:.1f} s against {url}, {os.cpu_count()} CPU cores (this client's flags: {cpu_flags()})\n")
    print(markdown_table(["route", "requests", "200", "req/s", "p50 ms", "p95 ms", "p99 ms", "503 (back-pressure)",
                          "other errors"], rows))


if __name__ == "__main__":
    main()
