"""Start-up time of `rag serve` (process start → /readyz 200) and `rag ask` (process start → answer printed).

    python bench/startup.py [--runs 1] [--index DIR] [--question "..."]

Rows, all measured in this run on the shipped corpus (indexed once first, not timed):
  before  RAG_DECODER_CACHE=off: the .gguf decoder is parsed and dequantised at every start, as before the cache
  cold    decoder cache enabled but empty: the first start ever, which also writes the dequantised copy
  warm    decoder cache filled by an earlier start: every later start
Each cell is the median over --runs fresh processes (cold: each with an empty cache folder of its own).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How do I set a timeout on an HTTPX client?"


def environment(cache_dir: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RAG_DECODER_CACHE", "RAG_CACHE_DIR", "RAG_MODEL_CACHE_DIR", "OMP_NUM_THREADS"):
        env.pop(name, None)
    if cache_dir is None:
        env["RAG_DECODER_CACHE"] = "off"
    else:
        env["RAG_CACHE_DIR"] = str(cache_dir)
        env["RAG_MODEL_CACHE_DIR"] = str(cache_dir / "onnx")  # the query encoder's export is cold or warm with it
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_serve(index: Path, cache_dir: Path | None, timeout: float = 300) -> float:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--index", str(index), "--port", str(port),
                               "--log-level", "warning"], env=environment(cache_dir), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"rag serve exited: {server.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - started > timeout:
                raise RuntimeError("rag serve did not become ready in time")
            time.sleep(0.05)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def time_ask(index: Path, cache_dir: Path | None, question: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cli", "ask", question, "--index", str(index)],
                            env=environment(cache_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"rag ask failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="Processes per cell (the median is shown).")
    parser.add_argument("--index", type=Path, help="An index of the corpus (default: built from corpus/ first).")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; flags: {cpu_flags()}")
    work = Path(tempfile.mkdtemp(prefix="rag-startup-"))
    try:
        index = args.index
        if index is None:
            index = work / "index"
            # Exit code 1 is expected: corpus/formats/LICENSE is not a document type.
            subprocess.run([sys.executable, "-m", "cli", "ingest", str(ROOT / "corpus"), "--index", str(index),
                            "--json"], env=environment(None), cwd=ROOT, stdout=subprocess.DEVNULL)
        measures = {"rag serve": lambda cache: time_serve(index, cache),
                    "rag ask": lambda cache: time_ask(index, cache, args.question)}
        rows = []
        for command, measure in measures.items():
            before = [measure(None) for _ in range(args.runs)]
            cold, warm = [], []
            for run in range(args.runs):
                cache = work / f"cache-{command.split()[1]}-{run}"
                cold.append(measure(cache))
                warm.append(measure(cache))  # the same folder, now holding the dequantised copy
            rows.append((command, statistics.median(before), statistics.median(cold), statistics.median(warm)))
            print(f"  measured {command}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nStart-up, seconds (median of {args.runs} run(s) each; ready = /readyz 200, ask = answer printed)\n")
    print("| command | before (RAG_DECODER_CACHE=off) | cold (cache empty) | warm (cache filled) | warm vs before |")
    print("|---|---:|---:|---:|---:|")
    for command, before, cold, warm in rows:
        print(f"| {command} | {before:.1f} | {cold:.1f} | {warm:.1f} | {before / warm:.1f}x faster |")


if __name__ == "__main__":
    main()
