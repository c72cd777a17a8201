"""Per-stage latency of the RAG answer path: embed query, search, prompt build, generate.

    .venv/bin/python bench/query.py [--questions 50] [--max-new-tokens 32]

XQuAD's 240 paragraphs are ingested into a temporary index; 50 of its questions (fixed seed) are answered with
the default decoder. Prints p50/p95 per stage and the share of answer time spent outside generation.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, percentile, shared_dataset  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.datasets import read_dataset, write_contexts  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.generation import GenerationParams, load_generator  # noqa: E402
from rag.pipeline import Pipeline  # noqa: E402
from rag.prompt import PromptBuilder, PromptMode  # noqa: E402
from rag.retrieve import Retriever  # noqa: E402
from rag.store import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    dataset = read_dataset(args.dataset or shared_dataset("xquad-en/xquad.en.json"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-query-"))
    settings = Settings(index_dir=workdir / "index")
    embedder = Embedder()
    IngestJob(settings, embedder).run(write_contexts(dataset, workdir / "passages"))
    retriever = Retriever(Store.open(settings.index_dir, embedder.name), embedder)
    generator = load_generator(settings)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    builder = PromptBuilder(generator.tokenizer, generator.context_window, params.max_new_tokens)
    Pipeline(settings, retriever, generator).answer("warm up?", params=GenerationParams(max_new_tokens=2))

    stages: dict[str, list[float]] = {"embed query (alone)": [], "retrieve (embed + search + fuse)": [],
                                      "prompt build": [], "generate": []}
    totals, tokens = [], []
    for item in random.Random(0).sample(dataset.items, args.questions):
        started = time.perf_counter()
        embedder.encode_query(item.question)
        embedded = time.perf_counter()
        # embeds the query again, as an answer does
        hits = retriever.retrieve(item.question, settings.prompt_chunks, collection=settings.collection)
        retrieved = time.perf_counter()
        prompt = builder.build(item.question, hits, PromptMode.RAG)
        built = time.perf_counter()
        generation = generator.generate(prompt.messages, params)
        generated = time.perf_counter()
        stages["embed query (alone)"].append((embedded - started) * 1000)
        stages["retrieve (embed + search + fuse)"].append((retrieved - embedded) * 1000)
        stages["prompt build"].append((built - retrieved) * 1000)
        stages["generate"].append((generated - built) * 1000)
        totals.append(generated - embedded)  # what an answer costs: retrieve (with its embedding), prompt, generate
        tokens.append((prompt.token_count, generation.tokens_out))

    rows = [[name, f"{percentile(values, 50):.1f}", f"{percentile(values, 95):.1f}", f"{sum(values) / len(values):.1f}"]
            for name, values in stages.items()]
    print(markdown_table(["stage", "p50 ms", "p95 ms", "mean ms"], rows))
    answer_ms = sum(totals) * 1000
    outside = answer_ms - sum(stages["generate"])
    print(f"\n{args.questions} questions, mean prompt {sum(t[0] for t in tokens) / len(tokens):.0f} tokens, "
          f"mean output {sum(t[1] for t in tokens) / len(tokens):.1f} tokens (max {args.max_new_tokens}); "
          f"device {generator.device if hasattr(generator, 'device') else 'n/a'}; CPU flags: {cpu_flags()}.")
    print(f"Retrieval + prompt share of answer time: {outside / answer_ms:.2%} (target ≤ 5%).")


if __name__ == "__main__":
    main()
