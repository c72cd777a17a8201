"""/v1/ask end to end on the in-process decoder and on vLLM (the `openai` backend), idle and beside a CPU hog.

    .venv/bin/python bench/serving.py [--clients 1 8 32] [--requests 4] [--max-new-tokens 32] [--k 2]

Ingests corpus/httpx into a temporary index, then for each backend starts `uvicorn api.app:create_app` on a
loopback port (for vLLM, first the engine itself through scripts/engine.sh, which serves the packaged SmolLM2 in
fp32, eager) and, for each concurrency, with the machine as it is ("idle") and then with a subprocess spinning on one
core beside it ("hog"), sends max(clients, --requests) /v1/ask requests from that many concurrent clients (each a
closed loop). Both backends answer on the `rag` path with the same prompts, greedy, no abstention, so they do the
same work; the API lets 1 and then 8 generations (its default, decoded together) in at once in-process, and up to
--clients at once on vLLM, which batches them. Reported per cell: answered requests, requests/s, generated tokens/s,
p50/p95 seconds; with the CPU's flags and the load average, since the machine may be shared. Defaults take about
ten minutes here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_flags, markdown_table, percentile  # noqa: E402
from bench.decoder_threads import start_hog, stop_hog  # noqa: E402
from bench.load import BENCH_KEY, QUERIES, _free_port, build_index, start_server, wait_ready  # noqa: E402
from rag.generation.transformers_backend import MAX_BATCH  # noqa: E402
from tests.engine import running_engine  # noqa: E402

CLIENTS = (1, 8, 32)
MAX_MODEL_LEN = 2048
READY_TIMEOUT_S = 900  # the API server loads the embedder and the decoder: minutes on a busy 2-core machine
CLIENT_TIMEOUT_S = 900.0  # 32 queued answers in-process beside a hog take minutes: measure them, do not drop them


async def cell(url: str, clients: int, requests: int, body: dict) -> tuple[list[float], int, float, int]:
    """(seconds of each answered request, generated tokens, wall seconds, failed requests) for `requests` requests
    from `clients` concurrent closed-loop clients."""
    queue = list(range(requests))
    seconds: list[float] = []
    tokens, failed = 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failed
        while queue:
            turn = queue.pop()
            started = time.perf_counter()
            response = await http.post("/v1/ask", json={**body, "question": QUERIES[turn % len(QUERIES)]})
            if response.status_code == 200:
                seconds.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]
            else:
                failed += 1
                print(f"  {response.status_code}: {response.text[:200]}", file=sys.stderr)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {BENCH_KEY}"}, limits=limits,
                                 timeout=CLIENT_TIMEOUT_S) as http:
        await http.post("/v1/ask", json={**body, "question": QUERIES[0]})  # first-request costs out
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return seconds, tokens, time.perf_counter() - started, failed


def measure(name: str, url: str, args: argparse.Namespace, clients_list: list[int],
            rows: list[list[object]]) -> None:
    body = {"path": "rag", "k": args.k, "max_new_tokens": args.max_new_tokens}
    for clients in clients_list:
        for condition in ("idle", "hog"):
            hog = start_hog() if condition == "hog" else None
            try:
                seconds, tokens, wall, failed = asyncio.run(cell(url, clients, max(clients, args.requests), body))
            finally:
                if hog:
                    stop_hog(hog)
            row = [name, clients, condition, len(seconds), failed, f"{len(seconds) / wall:.2f}",
                   f"{tokens / wall:.1f}", f"{percentile(seconds, 50):.2f}", f"{percentile(seconds, 95):.2f}"]
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
            rows.append(row)


def serve_api(index: Path, env: dict[str, str], log: Path, args: argparse.Namespace, name: str,
              clients: list[int], rows: list[list[object]]) -> None:
    port = _free_port()
    # Every request waits for its turn (no 503s): latency under load is what is measured.
    env = {"RAG_ABSTAIN": "false", "RAG_PACKAGED_ADAPTER": "false", "RAG_MAX_QUEUE": "1000",
           "RAG_QUEUE_TIMEOUT_S": str(CLIENT_TIMEOUT_S), **env}
    server = start_server(index, port, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, timeout=READY_TIMEOUT_S)
        measure(name, url, args, clients, rows)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="concurrent clients per cell")
    parser.add_argument("--in-process-clients", type=int, nargs="+", default=None, help="clients for the "
                        "in-process backend (default: --clients); it decodes at most 8 requests together, so past "
                        "that more clients only lengthen the queue")
    parser.add_argument("--in-process-generations", type=int, nargs="+", default=[1, MAX_BATCH],
                        help="RAG_MAX_CONCURRENT_GENERATIONS of the in-process API, one server each: 1 decodes one "
                        f"request at a time, {MAX_BATCH} (the default) lets that many be decoded together")
    parser.add_argument("--no-engine", action="store_true", help="the in-process backend only (no vLLM)")
    parser.add_argument("--requests", type=int, default=4, help="requests per cell at least (else one per client)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=2, help="chunks per prompt (~200 tokens each)")
    parser.add_argument("--engine-threads", type=int, default=None, help="vLLM's CPU threads (default: the "
                        "script's, all cores but one)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the index and the servers' logs here "
                        "(an index already there is reused); default: a temporary folder")
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="serving-") as folder:
        work = args.workdir or Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "index").exists():
            build_index(ROOT / "corpus" / "httpx", work / "index")
        for generations in args.in_process_generations:
            serve_api(work / "index", {"RAG_BACKEND": "transformers",
                                       "RAG_MAX_CONCURRENT_GENERATIONS": str(generations)},
                      work / f"api-inprocess-{generations}.log", args, f"in-process, {generations} at once",
                      args.in_process_clients or args.clients, rows)
        if not args.no_engine:
            with running_engine(_free_port(), work / "vllm.log", MAX_MODEL_LEN, threads=args.engine_threads) as base:
                # vLLM batches the requests it holds: let the API pass every client's on at once.
                serve_api(work / "index", {"RAG_BACKEND": "openai", "RAG_OPENAI_BASE_URL": base,
                                           "RAG_OPENAI_MODEL": "default",
                                           "RAG_MAX_CONCURRENT_GENERATIONS": str(max(args.clients))},
                          work / "api-vllm.log", args, "vLLM", args.clients, rows)

    print(f"CPU: {platform.processor() or platform.machine()}, flags: {cpu_flags()}, "
          f"cpus allowed: {len(os.sched_getaffinity(0))}")
    print(f"load average (1/5/15 min) at the start: {' '.join(f'{v:.2f}' for v in load_before)}, at the end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; /v1/ask, path rag, k={args.k}, "
          f"{args.max_new_tokens} new tokens, greedy; hog: one core spinning")
    print(markdown_table(["backend", "clients", "CPU", "answered", "failed", "req/s", "tokens/s", "p50 s", "p95 s"],
                         rows))


if __name__ == "__main__":
    main()
