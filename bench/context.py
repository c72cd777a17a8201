"""Embedding a chunk's context beside its text against in one input with it: tokens and seconds, same chunks, one run.

    .venv/bin/python bench/context.py [--dataset ../shared/datasets/financebench-dev] [--files 10] [--repeats 2]
        [--precision fp32 --precision auto]

The first `--files` filings are parsed and chunked by the project's own code; their chunks are embedded in windows
of whole documents, as `rag ingest` forms them (`ingest.job.EMBED_WINDOW_CHUNKS`), two ways, alternating so that
both see the same machine: "one input", each chunk's context line and text together (`Chunk.indexed_text`: what
was embedded before), and "apart", `Embedder.encode_chunks` (a long document's text and context embedded apart,
each distinct string once, table rules left out). Retrieval quality of the two is bench/documents.py's (runs 10
and 11 in the README).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, shared_dataset  # noqa: E402
from ingest.job import EMBED_WINDOW_CHUNKS, parse_file  # noqa: E402
from rag.config import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.types import Chunk  # noqa: E402


def windows(documents: list[list[Chunk]]) -> list[list[list[Chunk]]]:
    """Documents grouped until a group holds EMBED_WINDOW_CHUNKS chunks, as ingestion groups parsed files."""
    groups, group = [], []
    for chunks in documents:
        group.append(chunks)
        if sum(map(len, group)) >= EMBED_WINDOW_CHUNKS:
            groups.append(group)
            group = []
    return groups + ([group] if group else [])


def embed(embedder: Embedder, groups: list[list[list[Chunk]]], apart: bool) -> tuple[float, list[str]]:
    """Seconds to embed every window, and the strings the model was given."""
    given: list[str] = []
    encode = embedder.encode
    embedder.encode = lambda texts: given.extend(texts) or encode(texts)
    try:
        started = time.perf_counter()
        for group in groups:
            chunks = [chunk for document in group for chunk in document]
            if apart:
                embedder.encode_chunks(chunks, {document[0].doc_id: len(document) for document in group})
            else:
                embedder.encode([chunk.indexed_text for chunk in chunks])
        return time.perf_counter() - started, given
    finally:
        del embedder.encode


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
    groups = windows(documents)
    tokenizer = reference.tokenizer

    def tokens(texts: list[str]) -> int:
        return sum(map(len, tokenizer(texts, truncation=True, max_length=reference.max_tokens)["input_ids"]))

    rows = []
    for precision in args.precision or ["fp32", "auto"]:
        embedder = Embedder(precision=precision)
        embedder.encode(["warm up"] * embedder.batch_size)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        given: dict[bool, list[str]] = {}
        for _ in range(args.repeats):
            for apart in (False, True):
                elapsed, given[apart] = embed(embedder, groups, apart)
                seconds[apart].append(elapsed)
        for apart in (False, True):
            best = min(seconds[apart])
            rows.append([embedder.precision, "apart" if apart else "one input", len(given[apart]),
                         tokens(given[apart]), " / ".join(f"{s:.1f}" for s in seconds[apart]), f"{best:.1f}",
                         f"{best / min(seconds[False]):.2f}×"])
    chunks = sum(map(len, documents))
    print(f"{len(documents)} filings, {chunks} chunks, windows of {EMBED_WINDOW_CHUNKS}; CPU flags: {cpu_flags()}\n")
    print(markdown_table(["precision", "context", "inputs", "tokens", "s (each repeat)", "s (best)",
                          "vs one input"], rows))


if __name__ == "__main__":
    main()
