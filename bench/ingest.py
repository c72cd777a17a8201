"""Ingestion throughput: our pipeline vs raw sentence-transformers encode vs LangChain's FAISS.from_documents.

    .venv/bin/python bench/ingest.py [--corpus DIR ...] [--workers N] [--repeats R] [--out FILE.md]

Default corpus: ../shared/datasets/usgov-pdfs/ntsb (20 short PDFs and its README) plus
../shared/datasets/httpx-docs/docs (23 Markdown pages), copied side by side under one root in a scratch folder
(the ingest job takes a single root). For each repeat, in turn:

1. `IngestJob` into a fresh index with `--workers N` parse processes (parsing overlaps embedding), and again with
   one worker (parse and embed alternate in one process: no contention between them);
2. raw `SentenceTransformer.encode` of exactly what the embed stage gives the model for the chunks that landed in
   the index (read back with `Store.iter_chunks`; `rag.embed.chunk_inputs`: texts, and long documents' contexts
   apart, each distinct string once), same batch size, normalised, all in one call;
3. the same encode split into the calls the ingest job made (whole files until `ingest.job.embed_window` chunks),
   to separate the effect of grouping (length-sorting happens within one call) from CPU contention;
4. LangChain `FAISS.from_documents` with `HuggingFaceEmbeddings` (same model folder and batch size, normalised,
   CPU) on the chunk texts as LangChain Documents.

One Embedder instance (model already loaded and warmed up) serves the pipeline runs and the raw encodes; the
LangChain embeddings load their own copy of the model, also warmed up before timing. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED, cpu_flags, embed_windows, markdown_table, model_inputs  # noqa: E402
from ingest.job import IngestJob, embed_window  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.store import Store  # noqa: E402
from rag.types import ALL_COLLECTIONS, Chunk  # noqa: E402

DEFAULT_CORPORA = ["usgov-pdfs/ntsb", "httpx-docs/docs"]
SCRATCH = Path("/tmp/helper_bench")


def build_corpus(corpora: list[Path], scratch: Path) -> Path:
    """Copy every corpus folder (or file) into one root, each under its own name, so one job ingests them all."""
    root = Path(tempfile.mkdtemp(prefix="corpus-", dir=scratch))
    for index, corpus in enumerate(corpora):
        target = root / f"{index}-{corpus.parent.name}-{corpus.name}"
        if corpus.is_dir():
            shutil.copytree(corpus, target, symlinks=False)
        else:
            target.mkdir()
            shutil.copy2(corpus, target / corpus.name)
    return root


def describe(root: Path) -> str:
    files = [p for p in root.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    suffixes = Counter(p.suffix.lower() or "(none)" for p in files)
    return f"{len(files)} files (" + ", ".join(f"{n} {s}" for s, n in sorted(suffixes.items())) + ")"


def cpu_clock() -> tuple[float, float, float] | None:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children).

    Other processes' share of the CPUs over an interval = (busy − own) / (wall × CPUs): a benchmark on 2 cores
    is only meaningful when that stays near zero. Linux only (reads /proc/stat).
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / ticks
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system


def foreign_share(start: tuple | None, end: tuple | None) -> float | None:
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (wall * (os.cpu_count() or 1)))


def run_pipeline(embedder: Embedder, corpus: Path, workers: int, scratch: Path) -> dict:
    index_dir = Path(tempfile.mkdtemp(prefix=f"index-w{workers}-", dir=scratch))
    settings = Settings(index_dir=index_dir, parse_workers=workers, embedding_batch_size=embedder.batch_size)
    started = time.perf_counter()
    report = IngestJob(settings, embedder=embedder).run(corpus)
    wall = time.perf_counter() - started
    failed = report.failed
    if failed:
        print(f"  warning: {len(failed)} file(s) failed: " + "; ".join(f"{r.source}: {r.error}" for r in failed[:3]),
              file=sys.stderr)
    return {
        "index_dir": index_dir,
        "files": sum(1 for r in report.files if r.status in ("new", "changed")),
        "parse": report.parse_seconds,
        "chunk": report.chunk_seconds,
        "embed": report.embed_seconds,
        "total": report.total_seconds,
        "wall": wall,
        "chunks": report.chunks_added,
    }


def read_chunks(index_dir: Path) -> list[Chunk]:
    """The chunks in index order (files in the order the job embedded them)."""
    store = Store.open(index_dir)
    try:
        return list(store.iter_chunks(collection=ALL_COLLECTIONS))
    finally:
        store.close()


def time_raw_encode(embedder: Embedder, calls: list[list[str]]) -> float:
    model = embedder.model
    started = time.perf_counter()
    with embedder.autocast():  # the precision the pipeline embeds in, so the ratio compares like with like
        for texts in calls:
            model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)
    return time.perf_counter() - started


def load_langchain(embedder: Embedder):
    try:
        from langchain_community.vectorstores import FAISS
        from langchain_core.documents import Document
        from langchain_huggingface import HuggingFaceEmbeddings
    except ImportError as error:
        print(f"LangChain baseline skipped: {error} (install the dev extras: pip install -e '.[dev]')",
              file=sys.stderr)
        return None
    embeddings = HuggingFaceEmbeddings(
        model_name=str(embedder.path),
        model_kwargs={"device": "cpu", "local_files_only": True},
        encode_kwargs={"normalize_embeddings": True, "batch_size": embedder.batch_size},
    )
    embeddings.embed_documents(["warm up"] * embedder.batch_size)
    return FAISS, Document, embeddings


def time_langchain(langchain, texts: list[str]) -> float:
    FAISS, Document, embeddings = langchain
    documents = [Document(page_content=text) for text in texts]
    started = time.perf_counter()
    FAISS.from_documents(documents, embeddings)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, action="append", default=None,
                        help="folder or file to ingest; repeatable (default: the NTSB PDFs and the httpx docs)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parse worker processes for the overlapped run (default: %(default)s)")
    parser.add_argument("--precision", default="auto", help="embedding precision: auto | fp32 | bf16")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every measurement; medians are reported")
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-worker (no overlap) run")
    parser.add_argument("--no-langchain", action="store_true",
                        help="skip the LangChain FAISS.from_documents baseline")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables to this file")
    parser.add_argument("--keep", action="store_true", help=f"keep the scratch corpus and indexes under {SCRATCH}")
    args = parser.parse_args()

    if args.corpus:
        corpora = args.corpus
        missing = [str(p) for p in corpora if not p.exists()]
        if missing:
            sys.exit(f"Corpus not found: {', '.join(missing)}")
    else:
        corpora = [SHARED / relative for relative in DEFAULT_CORPORA]
        missing = [str(p) for p in corpora if not p.exists()]
        if missing:
            sys.exit(f"Benchmark data not found at {', '.join(missing)} (expected ../shared/datasets next to the "
                     "repository): pass folders to ingest with --corpus DIR (repeatable).")

    SCRATCH.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=SCRATCH))
    try:
        corpus = build_corpus(corpora, scratch)
        corpus_description = describe(corpus)
        print(f"Corpus: {', '.join(str(c) for c in corpora)} → {corpus} [{corpus_description}]", flush=True)

        import torch

        embedder = Embedder(precision=args.precision)
        started = time.perf_counter()
        embedder.encode(["warm up"] * embedder.batch_size)
        loaded = time.perf_counter() - started
        print(f"Model {embedder.name} on {embedder.device}, loaded + warmed up in {loaded:.1f} s; "
              f"batch size {embedder.batch_size}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs", flush=True)
        langchain = None if args.no_langchain else load_langchain(embedder)

        configs = [args.workers] + ([1] if not args.no_sequential and args.workers != 1 else [])
        pipeline: dict[int, list[dict]] = {workers: [] for workers in configs}
        raw, grouped, lc = [], [], []
        chunks: list[Chunk] | None = None
        groups: list[list[Chunk]] = []
        foreign: list[float] = []
        for repeat in range(args.repeats):
            clock = cpu_clock()
            for workers in configs:
                result = run_pipeline(embedder, corpus, workers, scratch)
                pipeline[workers].append(result)
                run_chunks = read_chunks(result["index_dir"])
                if chunks is None:
                    documents = [list(chunks) for _, chunks in groupby(run_chunks, key=lambda chunk: chunk.doc_id)]
                    chunks, groups = run_chunks, embed_windows(documents, embed_window(embedder.batch_size))
                elif [chunk.text for chunk in run_chunks] != [chunk.text for chunk in chunks]:
                    print("  warning: chunk texts differ between runs", file=sys.stderr)
                shutil.rmtree(result.pop("index_dir"), ignore_errors=True)
                print(f"  [{repeat + 1}/{args.repeats}] pipeline workers={workers}: {result['chunks']} chunks, "
                      f"embed {result['embed']:.2f} s, total {result['total']:.2f} s", flush=True)
            raw.append(time_raw_encode(embedder, [model_inputs(chunks)]))
            grouped.append(time_raw_encode(embedder, [model_inputs(group) for group in groups]))
            print(f"  [{repeat + 1}/{args.repeats}] raw encode {raw[-1]:.2f} s, in the job's groups "
                  f"{[len(group) for group in groups]} {grouped[-1]:.2f} s", flush=True)
            if langchain:
                lc.append(time_langchain(langchain, [chunk.text for chunk in chunks]))
                print(f"  [{repeat + 1}/{args.repeats}] LangChain FAISS.from_documents {lc[-1]:.2f} s", flush=True)
            share = foreign_share(clock, cpu_clock())
            if share is not None:
                foreign.append(share)
                print(f"  [{repeat + 1}/{args.repeats}] other processes used {share:.0%} of the CPUs meanwhile"
                      + ("  ← numbers disturbed" if share > 0.05 else ""), flush=True)

        n = len(chunks)
        med = statistics.median
        raw_rate = n / med(raw)

        stage_rows = []
        for workers, results in pipeline.items():
            m = {key: med(r[key] for r in results) for key in ("parse", "chunk", "embed", "total")}
            chunks = results[0]["chunks"]
            label = f"overlapped, {workers} parse workers" if workers > 1 else "sequential, 1 worker (no overlap)"
            stage_rows.append([
                label, results[0]["files"], chunks, f"{m['parse']:.2f}", f"{m['chunk']:.2f}", f"{m['embed']:.2f}",
                f"{m['total']:.2f}", f"{chunks / m['total']:.1f}", f"{chunks / m['embed']:.1f}",
                f"{(chunks / m['embed']) / raw_rate:.2f}×",
            ])
        pipeline_table = markdown_table(
            ["ingest run", "files", "chunks", "parse s (Σ workers)", "chunk s (Σ workers)", "embed s",
             "total wall s", "chunks/s end-to-end", "embed-stage chunks/s", "embed stage / raw encode"],
            stage_rows,
        )

        calls = " + ".join(str(len(group)) for group in groups)
        encode_rows = [["raw `SentenceTransformer.encode` of the model inputs, all in one call", f"{med(raw):.2f}",
                        f"{raw_rate:.1f}", "1.00×"],
                       [f"raw encode in the job's encode calls ({calls} chunks)",
                        f"{med(grouped):.2f}",
                        f"{n / med(grouped):.1f}", f"{med(raw) / med(grouped):.2f}×"]]
        for workers, results in pipeline.items():
            embed = med(r["embed"] for r in results)
            encode_rows.append([f"our embed stage, {workers} parse worker{'s' if workers > 1 else ''}",
                                f"{embed:.2f}", f"{n / embed:.1f}", f"{med(raw) / embed:.2f}×"])
        if lc:
            encode_rows.append(["LangChain `FAISS.from_documents` (embed + index build)", f"{med(lc):.2f}",
                                f"{n / med(lc):.1f}", f"{med(raw) / med(lc):.2f}×"])
        encode_table = markdown_table(["embedding path, same chunks", "seconds", "chunks/s", "vs raw encode"],
                                      encode_rows)

        summary = (f"{n} chunks from {corpus_description}; {embedder.name}, batch {embedder.batch_size}, "
                   f"{embedder.device} {embedder.precision} (LangChain: fp32, its default), "
                   f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs "
                   f"({platform.processor() or platform.machine()}; CPU flags: {cpu_flags()}); "
                   f"medians of {args.repeats} run(s)")
        if foreign:
            summary += f"; other processes took at most {max(foreign):.0%} of the CPUs during a repeat"
            if max(foreign) > 0.05:
                print("\nWARNING: other processes competed for the CPUs; rerun on an idle machine.", file=sys.stderr)
        summary += "."
        output = "\n\n".join([pipeline_table, encode_table, summary])
        print("\n" + output)
        if args.out:
            args.out.write_text(output + "\n")
            print(f"\nWritten to {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
