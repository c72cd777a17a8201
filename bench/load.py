"""Load test of the HTTP API: scenarios of concurrent closed-loop clients against a uvicorn server on this machine.

    .venv/bin/python bench/load.py                      # 32 clients on /v1/search for 60 s, then 8 on /v1/ask
    .venv/bin/python bench/load.py --search-clients 32 --ask-clients 8 --duration 30 --max-new-tokens 8
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key KEY     # a server already running here

Without --url it ingests corpus/httpx into a temporary index (or uses --index), starts
`uvicorn --factory api.app:create_app` on a free loopback port in a separate process, waits for /readyz, runs the
scenarios one after the other, and stops the server. In a scenario every client is a closed loop on one route
(send, wait for the reply, send again) until the duration ends; a 503 is back-pressure, and the client waits its
Retry-After before sending again, as a well-behaved client would.

Reported per scenario: clients, seconds, requests, req/s and p50/p95/p99 latency of the answered ones, 503s,
client time-outs (--timeout), other errors by status, and the server's resident memory (now and peak) when this
script started the server; with the CPU's flags and the load average before and after, since the machine may be
shared. Targets (issue #28): no errors at 32 search clients, no client time-outs at 8 ask clients. Only loopback
servers are accepted, and clients and duration are bounded.
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
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

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
SEARCH_CLIENTS = 32  # the scenarios
ASK_CLIENTS = 8
DURATION_S = 60.0
MAX_DURATION_S = 600.0  # a load test on a shared machine stays short
MAX_CLIENTS = 256
CLIENT_TIMEOUT_S = 60.0
MAX_NEW_TOKENS = 8
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TIMEOUT = "timeout"  # the status recorded for a request the client gave up on


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


def start_server(index: Path, port: int, env_extra: dict[str, str], log: Path) -> subprocess.Popen:
    """uvicorn in a process of its own; its warnings and errors go to `log` (to explain any failed request)."""
    env = {**os.environ, "RAG_INDEX_DIR": str(index), "RAG_API_KEYS": BENCH_KEY, **env_extra}
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log", "--log-level", "warning"]
    with log.open("wb") as stderr:
        return subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr)


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


def server_memory_mb(process: subprocess.Popen | None) -> tuple[float, float] | None:
    """(resident, peak resident) MB of the server process this script started, from /proc."""
    if process is None:
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
    except OSError:
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def request_body(route: str, turn: int, max_new_tokens: int) -> dict:
    query = QUERIES[turn % len(QUERIES)]
    return {"query": query, "k": 5} if route == "search" else {"question": query, "k": 3,
                                                                "max_new_tokens": max_new_tokens}


async def client_loop(http: httpx.AsyncClient, route: str, number: int, deadline: float, max_new_tokens: int,
                      records: list[tuple[str, float]]) -> None:
    turn = number
    while time.monotonic() < deadline:
        turn += 7
        started = time.perf_counter()
        retry_after = 0.0
        try:
            response = await http.post(f"/v1/{route}", json=request_body(route, turn, max_new_tokens))
            status = str(response.status_code)
            if response.status_code == 503:
                retry_after = float(response.headers.get("Retry-After", "1"))
        except httpx.TimeoutException:
            status = TIMEOUT
        except httpx.TransportError as error:
            status = type(error).__name__
        records.append((status, time.perf_counter() - started))
        await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))


@dataclass
class Result:
    route: str
    clients: int
    seconds: float
    requests: int
    answered: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rejected_503: int
    timeouts: int
    errors: dict[str, int]
    server_rss_mb: float | None
    server_peak_rss_mb: float | None
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


async def run_scenario(url: str, api_key: str, route: str, clients: int, duration: float, max_new_tokens: int,
                       timeout: float) -> tuple[list[tuple[str, float]], float]:
    records: list[tuple[str, float]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                                 timeout=timeout) as http:
        await http.post(f"/v1/{route}", json=request_body(route, 0, max_new_tokens))  # first-request costs out
        started = time.monotonic()
        deadline = started + duration
        await asyncio.gather(*(client_loop(http, route, number, deadline, max_new_tokens, records)
                               for number in range(clients)))
        return records, time.monotonic() - started


def summarise(route: str, clients: int, records: list[tuple[str, float]], elapsed: float,
              memory: tuple[float, float] | None, load_before: tuple, load_after: tuple) -> Result:
    ok = [seconds * 1000 for status, seconds in records if status == "200"]
    statuses = Counter(status for status, _ in records)
    errors = {status: n for status, n in statuses.items() if status not in ("200", "503", TIMEOUT)}
    rss, peak = memory or (None, None)
    return Result(route, clients, round(elapsed, 1), len(records), len(ok), round(len(ok) / elapsed, 1),
                  round(percentile(ok, 50), 1), round(percentile(ok, 95), 1), round(percentile(ok, 99), 1),
                  statuses.get("503", 0), statuses.get(TIMEOUT, 0), errors,
                  round(rss) if rss else None, round(peak) if peak else None,
                  tuple(round(x, 2) for x in load_before), tuple(round(x, 2) for x in load_after))


def table(results: list[Result]) -> str:
    rows = [[f"/v1/{r.route}", r.clients, r.seconds, r.requests, r.answered, r.throughput_rps, r.p50_ms, r.p95_ms,
             r.p99_ms, r.rejected_503, r.timeouts, ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or 0,
             f"{r.server_rss_mb} ({r.server_peak_rss_mb})" if r.server_rss_mb else "-",
             f"{r.load_before[0]} → {r.load_after[0]}"] for r in results]
    return markdown_table(["route", "clients", "s", "requests", "200", "req/s", "p50 ms", "p95 ms", "p99 ms", "503",
                           "client time-outs", "other errors", "server RSS MB (peak)", "load avg (1 min)"], rows)


def bounded(low: float, high: float, kind: type = int):
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {text}")
        return value
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-clients", type=bounded(0, MAX_CLIENTS), default=SEARCH_CLIENTS,
                        help=f"Clients of the /v1/search scenario; 0 skips it (default {SEARCH_CLIENTS}).")
    parser.add_argument("--ask-clients", type=bounded(0, MAX_CLIENTS), default=ASK_CLIENTS,
                        help=f"Clients of the /v1/ask scenario; 0 skips it (default {ASK_CLIENTS}).")
    parser.add_argument("--duration", type=bounded(1, MAX_DURATION_S, float), default=DURATION_S,
                        help=f"Seconds of each scenario (default {DURATION_S:g}, at most {MAX_DURATION_S:g}).")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"Of every ask (default {MAX_NEW_TOKENS}).")
    parser.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S,
                        help=f"Seconds a client waits for a reply before giving up (default {CLIENT_TIMEOUT_S:g}).")
    parser.add_argument("--url", help="Use this running server (on this machine) instead of starting one.")
    parser.add_argument("--api-key", default=BENCH_KEY)
    parser.add_argument("--index", type=Path, help="Index to serve (default: corpus/httpx ingested into a temp dir).")
    parser.add_argument("--docs", type=Path, default=ROOT / "corpus" / "httpx")
    parser.add_argument("--server-env", action="append", default=[], metavar="RAG_NAME=VALUE",
                        help="A setting of the started server, e.g. RAG_QUEUE_TIMEOUT_S=30 (repeatable; default: "
                             "the server's own defaults).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must be a server on this machine ({', '.join(LOOPBACK)}), got {args.url}")
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if not all(name.startswith("RAG_") for name in server_env):
        parser.error("--server-env takes RAG_NAME=VALUE settings")

    process = None
    url = args.url
    if url is None:
        index = args.index or Path(tempfile.mkdtemp(prefix="bench-load-")) / "index"
        if not (index / "CURRENT").exists():
            build_index(args.docs, index)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server_log = Path(tempfile.gettempdir()) / f"bench-load-server-{port}.log"
        process = start_server(index, port, server_env, server_log)
        print(f"server log: {server_log}", file=sys.stderr)
    results = []
    try:
        wait_ready(url, process)
        for route, clients in (("search", args.search_clients), ("ask", args.ask_clients)):
            if not clients:
                continue
            load_before = os.getloadavg()
            records, elapsed = asyncio.run(run_scenario(url, args.api_key, route, clients, args.duration,
                                                        args.max_new_tokens, args.timeout))
            results.append(summarise(route, clients, records, elapsed, server_memory_mb(process), load_before,
                                     os.getloadavg()))
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    if args.json:
        print(json.dumps({"url": url, "cpu_flags": cpu_flags(), "cpu_cores": os.cpu_count(),
                          "max_new_tokens": args.max_new_tokens, "client_timeout_s": args.timeout,
                          "server_env": server_env, "scenarios": [asdict(r) for r in results]}, indent=2))
        return
    print(f"{url}, {os.cpu_count()} CPU cores (flags: {cpu_flags()}), asks with max_new_tokens="
          f"{args.max_new_tokens}, client time-out {args.timeout:g} s, server settings {server_env or 'default'}\n")
    print(table(results))


if __name__ == "__main__":
    main()
