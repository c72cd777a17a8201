"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rag import models
from rag.embed import chunk_inputs
from rag.types import Chunk

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def shared_dataset(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        sys.exit(f"Benchmark data not found at {path}: pass its location explicitly (see --help).")
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def publish(lines: list[str], out: Path | None) -> None:
    """A bench's report: printed, and written to `out` when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def embed_windows(documents: list[list[Chunk]], flush_at: int) -> list[list[Chunk]]:
    """The chunks of each encode call `rag ingest` makes: whole documents gathered until at least `flush_at` chunks
    (`ingest.job.embed_window`)."""
    windows, pending = [], []
    for chunks in documents:
        pending += chunks
        if len(pending) >= flush_at:
            windows.append(pending)
            pending = []
    return windows + ([pending] if pending else [])


def model_inputs(window: list[Chunk]) -> list[str]:
    """What the embed stage gives the model for one window of whole documents (`Embedder.encode_chunks`)."""
    return chunk_inputs(window, Counter(chunk.doc_id for chunk in window)).distinct


def timed_writes(begin: Callable[[], Any], data: Any, first_doc: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` commits that add one new document (`data.documents`, bench/scale.py's synthetic data,
    from `first_doc`), then of `repeats` commits that delete one document each: each a writer's whole life (begin,
    change, commit, close), as an upload or delete job's, on either store (`begin` opens its writer)."""
    uploads, deletes = [], []
    for writes, change in ((uploads, lambda writer, r: writer.add_document(*next(data.documents(first_doc + r, 1,
                                                                                                 seed_offset=7)))),
                           (deletes, lambda writer, r: writer.delete([f"{r * 97:016x}"]))):
        for r in range(repeats):
            started = time.perf_counter()
            writer = begin()
            change(writer, r)
            writer.commit()
            writer.close()
            writes.append(time.perf_counter() - started)
    return {"upload_s": uploads, "delete_s": deletes}


class GivenVectors:
    """A query encoder for the scale benches: each synthetic query's vector stands in for its embedded text."""

    name = "synthetic"

    def __init__(self, texts: list[str], vectors: Any):
        self.by_text = dict(zip(texts, vectors))

    def follow(self, index_weights: Any) -> None:
        pass

    def encode_query(self, text: str) -> Any:
        return self.by_text[text]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions that change model speed (bf16 autocast needs avx512_bf16 or amx;
    int8 needs VNNI to run at full range)."""
    if not (flags := models.cpu_flags()):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    present = [flag for flag in wanted if flag in flags]
    return " ".join(present) or "none of " + ", ".join(wanted)


def dev_split(doc_name: str) -> str:
    """Which half of a development set a filing belongs to, "tune" or "report", so that what the reranker is
    trained and settings are tuned on is never what is reported. CRC-32 of the name is stable across runs and
    machines; on financebench-dev it puts 16 filings (25 questions) in "tune" and 14 (23) in "report"."""
    return "tune" if zlib.crc32(doc_name.encode()) % 2 == 0 else "report"
