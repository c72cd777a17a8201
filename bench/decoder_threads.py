"""The in-process decoder's speed when the CPU is shared: torch threads policy × (idle, one-core hog).

    .venv/bin/python bench/decoder_threads.py [--runs 8] [--tokens 32] [--budget-s 900]

Loads the packaged SmolLM2-135M once on the CPU and, per round, runs one greedy generation of --tokens new tokens
for every policy, first with the machine as it is ("idle"), then with a subprocess spinning `while True: pass` on
one core beside it ("hog"). Policies: 1 and 2 are fixed thread counts (RAG_DECODER_THREADS=1 / 2; 2 is torch's
default on 2 cores), auto is the adaptive rule of `DecoderThreads`. Alternating in each round spreads the noise of
other work on the machine over every cell alike. Prints CPU flags, load average and, per cell, p50/p95 seconds per
answer, tokens/s and the thread counts auto picked. Rounds stop early once --budget-s is spent (the 2-thread hog
cell can take ~30 s an answer).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_flags, markdown_table, percentile  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]
POLICIES = ("1", "2", "auto")


def start_hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def stop_hog(hog: subprocess.Popen) -> None:
    hog.terminate()
    hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="generations per cell")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--budget-s", type=float, default=900.0, help="stop starting rounds after this long")
    args = parser.parse_args()

    import torch

    from rag.generation import GenerationParams, TransformersGenerator
    from rag.generation.transformers_backend import DecoderThreads

    load_before = os.getloadavg()
    generator = TransformersGenerator(device="cpu")
    params = GenerationParams(max_new_tokens=args.tokens)
    generator.generate(PROMPT, params)  # warm-up
    policies = {name: DecoderThreads(setting=None if name == "auto" else int(name)) for name in POLICIES}
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list[int]] = {}
    picked: dict[tuple[str, str], Counter] = {}
    started, rounds = time.monotonic(), 0
    for round_ in range(args.runs):
        if round_ and time.monotonic() - started > args.budget_s:
            break
        for condition in ("idle", "hog"):
            hog = start_hog() if condition == "hog" else None
            try:
                if hog:
                    time.sleep(0.5)
                order = POLICIES[round_ % 3:] + POLICIES[:round_ % 3]  # rotate who goes first
                for name in order:
                    generator._threads = policies[name]
                    before = torch.get_num_threads()
                    result = generator.generate(PROMPT, params)
                    assert torch.get_num_threads() == before
                    key = (name, condition)
                    times.setdefault(key, []).append(result.seconds)
                    tokens.setdefault(key, []).append(result.tokens_out)
                    picked.setdefault(key, Counter())[policies[name].last] += 1
                    busy = policies[name].others_busy
                    note = f", others busy {busy:.2f} cores" if busy is not None else ""
                    print(f"round {round_} {condition:4} {name:4} {result.seconds:6.2f} s {result.tokens_out} "
                          f"tokens, {policies[name].last} threads{note}", file=sys.stderr, flush=True)
            finally:
                if hog:
                    stop_hog(hog)
        rounds += 1

    print(f"CPU: {platform.processor() or platform.machine()}, flags: {cpu_flags()}, "
          f"cpus allowed: {len(os.sched_getaffinity(0))}, torch default threads: {torch.get_num_threads()}")
    print(f"load average (1/5/15 min) at the start: {' '.join(f'{v:.2f}' for v in load_before)}, at the end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; rounds: {rounds}, {args.tokens} new tokens each, greedy")
    rows = []
    for name in POLICIES:
        for condition in ("idle", "hog"):
            seconds, counts = times.get((name, condition), []), tokens.get((name, condition), [])
            rate = sum(counts) / sum(seconds) if seconds else float("nan")
            used = ", ".join(f"{k}×{v}" for k, v in sorted(picked.get((name, condition), Counter()).items()))
            rows.append([name, condition, len(seconds), f"{percentile(seconds, 50):.2f}",
                         f"{percentile(seconds, 95):.2f}", f"{rate:.1f}", used])
    print(markdown_table(["threads", "CPU", "n", "p50 s/answer", "p95 s/answer", "tokens/s", "threads used"], rows))


if __name__ == "__main__":
    main()
