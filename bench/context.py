"""Embedding a chunk's context beside its text against in one input with it: tokens and seconds, same chunks, one run.

    .venv/bin/python bench/context.py [--dataset ../shared/datasets/financebench-dev] [--files 10] [--repeats 2]
        [--precision fp32 --precision auto]

The first `--files` filings are parsed and chunked by the project's own code; their chunks are embedded in windows
of whole documents, as `rag ingest` forms them (`ingest.job.embed_window`), two ways, alternating so that
both see the same machine: "one input", each chunk's context line and text together (`Chunk.indexed_text`: what
was embedded before), and "apart", `Embedder.encode_chunks` (a long document's text and context embedded apart,
each distinct string once, table rules left out). Retrieval quality of the two is bench/documents.py's (runs 10
and 11 in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, embed_windows, markdown_table, model_inputs, shared_dataset  # noqa: E402
from ingest.job import embed_window, parse_file  # noqa: E402
from rag.config import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.types import Chunk  # noqa: E402


def given(windows: list[list[Chunk]], apart: bool) -> list[str]:
    """The strings the model is given for every window, one way or the other."""
    return [text for window in windows
            for text in (model_inputs(window) if apart else [chunk.indexed_text for chunk in window])]


def embed(embedder: Embedder, windows: list[list[Chunk]], apart: bool) -> float:
    """Seconds to embed every window."""
    started = time.perf_counter()
    for window in windows:
        if apart:
            embedder.encode_chunks(window, Counter(chunk.doc_id for chunk in window))
        else:
            embedder.encode([chunk.indexed_text for chunk in window])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", action="append", default=None)
    args = parser.parse_args()
    dataset = args.dataset or shared_dataset("financebench-dev")
    reference = Embedder(precision="fp32")
    documents = []
    for path in sorted((dataset / "pdfs").glob("*.pdf"))[:args.files]:
        parsed = parse_file(str(path), path.name, str(reference.path), DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_OVERLAP,
                            reference.max_tokens)
        if parsed.chunks:
            documents.append(parsed.chunks)
    windows = embed_windows(documents, embed_window(reference.batch_size))
    tokenizer = reference.tokenizer

    def tokens(texts: list[str]) -> int:
        return sum(map(len, tokenizer(texts, truncation=True, max_length=reference.max_tokens)["input_ids"]))

    rows = []
    for precision in args.precision or ["fp32", "auto"]:
        embedder = Embedder(precision=precision)
        embedder.encode(["warm up"] * embedder.batch_size)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for apart in (False, True):
                seconds[apart].append(embed(embedder, windows, apart))
        for apart in (False, True):
            best = min(seconds[apart])
            inputs = given(windows, apart)
            rows.append([embedder.precision, "apart" if apart else "one input", len(inputs), tokens(inputs),
                         " / ".join(f"{s:.1f}" for s in seconds[apart]), f"{best:.1f}",
                         f"{best / min(seconds[False]):.2f}×"])
    chunks = sum(map(len, documents))
    print(f"{len(documents)} filings, {chunks} chunks, windows of {embed_window(reference.batch_size)}; "
          f"CPU flags: {cpu_flags()}\n")
    print(markdown_table(["precision", "context", "inputs", "tokens", "s (each repeat)", "s (best)",
                          "vs one input"], rows))


if __name__ == "__main__":
    main()
