"""Real documents: ingestion speed and document/page retrieval on FinanceBench filings, ours vs stock LangChain.

    .venv/bin/python bench/documents.py [--dataset ../shared/datasets/financebench-dev] [--limit N]
        [--precision fp32 --precision auto] [--out FILE.md]

One process, one run, the same machine for both pipelines:

- ours: `IngestJob` (pypdfium2 parsing, packed chunks with document context, default parse workers) into a fresh
  index, once per `--precision`, then dense, BM25 and hybrid retrieval;
- LangChain, stock: PyPDFLoader → RecursiveCharacterTextSplitter(1000, 200) → FAISS.from_documents with
  HuggingFaceEmbeddings on the same all-MiniLM-L6-v2 folder (its defaults: fp32, batch 32); BM25Retriever
  (rank_bm25) and EnsembleRetriever (dense + BM25, equal weights) for its bm25 and hybrid rows.

Both embedding models are loaded and warmed up before timing. Per question: document hit@1/@5 = the gold filing is
among the first 1/5 distinct documents of the top 40 chunks; evidence-page hit@5 = one of the top 5 chunks is from
the gold filing and starts on the evidence page (the dataset's `page` is 0-based; our pages are 1-based).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, shared_dataset  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from ingest.pdf_text import page_count  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.retrieve import Retriever, RetrieverKind  # noqa: E402
from rag.store import Store  # noqa: E402
from rag.types import DEFAULT_COLLECTION  # noqa: E402

DEPTH = 40  # chunks retrieved per question, from which the distinct documents are ranked


def score(rankings: list[list[tuple[str, int | None]]], questions: list[dict]) -> dict[str, float]:
    """rankings[i]: (document name, 1-based start page) of the chunks retrieved for question i, best first."""
    hit1 = hit5 = page5 = 0
    for ranked, question in zip(rankings, questions):
        documents = list(dict.fromkeys(name for name, _ in ranked))
        hit1 += documents[:1] == [question["doc_name"]]
        hit5 += question["doc_name"] in documents[:5]
        pages = {evidence["page"] + 1 for evidence in question["evidence"] if evidence["doc_name"] == question["doc_name"]}
        page5 += any(name == question["doc_name"] and page in pages for name, page in ranked[:5])
    n = len(questions) or 1
    return {"doc hit@1": hit1 / n, "doc hit@5": hit5 / n, "page hit@5": page5 / n}


def run_ours(files: list[Path], questions: list[dict], precision: str, workdir: Path) -> dict:
    embedder = Embedder(precision=precision)
    started = time.perf_counter()
    embedder.encode(["warm up"] * embedder.batch_size)  # model load (and, for onnx, export at first use)
    loaded = time.perf_counter() - started
    corpus = workdir / f"corpus-{precision}"
    corpus.mkdir()
    for path in files:
        (corpus / path.name).symlink_to(path)
    settings = Settings(index_dir=workdir / f"index-{precision}", embedding_precision=precision)
    report = IngestJob(settings, embedder).run(corpus, follow_links=True)
    retriever = Retriever(Store.open(settings.index_dir, embedder.name), embedder)
    retrieval = {}
    for kind in RetrieverKind:
        rankings = []
        for question in questions:
            hits = retriever.retrieve(question["question"], DEPTH, kind, collection=DEFAULT_COLLECTION)
            rankings.append([(Path(hit.chunk.source).stem, hit.chunk.page) for hit in hits])
        retrieval[kind.value] = score(rankings, questions)
    return {"name": f"ours ({embedder.precision})", "failed": len(report.failed),
            "failures": [f"{Path(r.source).name}: {r.error}" for r in report.failed],
            "chunks": report.chunks_added, "parse": report.parse_seconds + report.chunk_seconds,
            "embed": report.embed_seconds, "total": report.total_seconds, "retrieval": retrieval,
            "load": loaded}


def run_langchain(files: list[Path], questions: list[dict], model_path: Path) -> dict | None:
    try:
        from langchain_classic.retrievers import EnsembleRetriever
        from langchain_community.document_loaders import PyPDFLoader
        from langchain_community.retrievers import BM25Retriever
        from langchain_community.vectorstores import FAISS
        from langchain_huggingface import HuggingFaceEmbeddings
        from langchain_text_splitters import RecursiveCharacterTextSplitter
    except ImportError as error:
        print(f"LangChain baseline skipped: {error} (pip install -e '.[dev]')", file=sys.stderr)
        return None
    embeddings = HuggingFaceEmbeddings(model_name=str(model_path), model_kwargs={"device": "cpu"})
    embeddings.embed_documents(["warm up"] * 32)

    started = time.perf_counter()
    documents, failures = [], []
    for path in files:
        try:
            documents.extend(PyPDFLoader(str(path)).load())
        except Exception as error:  # the stock loop: one bad file is reported, the rest go on
            failures.append(f"{path.name}: {type(error).__name__}: {str(error)[:120]}")
    chunks = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200).split_documents(documents)
    split = time.perf_counter()
    store = FAISS.from_documents(chunks, embeddings)
    embedded = time.perf_counter()

    dense = store.as_retriever(search_kwargs={"k": DEPTH})
    bm25 = BM25Retriever.from_documents(chunks, k=DEPTH)
    retrievers = {"dense": dense, "bm25": bm25, "hybrid": EnsembleRetriever(retrievers=[dense, bm25],
                                                                            weights=[0.5, 0.5])}
    retrieval = {}
    for name, retriever in retrievers.items():
        rankings = []
        for question in questions:
            hits = retriever.invoke(question["question"])[:DEPTH]
            rankings.append([(Path(hit.metadata["source"]).stem, hit.metadata.get("page", -2) + 1) for hit in hits])
        retrieval[name] = score(rankings, questions)
    return {"name": "LangChain (fp32)", "failed": len(failures), "failures": failures, "chunks": len(chunks),
            "parse": split - started, "embed": embedded - split, "total": embedded - started,
            "retrieval": retrieval}


def tables(header: str, pages: int, results: list[dict]) -> str:
    reference = next((r for r in results if r["name"].startswith("LangChain")), None)
    speed_rows = [[r["name"], r["failed"], pages, r["chunks"], f"{r['parse']:.1f}", f"{r['embed']:.1f}",
                   f"{r['total']:.1f}", f"{pages / r['total']:.2f}",
                   f"{r['total'] / reference['total']:.2f}×" if reference else "–"] for r in results]
    speed = markdown_table(["pipeline", "files failed", "pages", "chunks", "parse s", "embed s", "total s",
                            "pages/s", "total vs LangChain"], speed_rows)
    quality_rows = [[r["name"], kind, *(f"{value:.3f}" for value in measures.values())]
                    for r in results for kind, measures in r["retrieval"].items()]
    quality = markdown_table(["pipeline", "retriever", "doc hit@1", "doc hit@5", "evidence-page hit@5"],
                             quality_rows)
    notes = [f"{r['name']} failed: {'; '.join(r['failures'])}" for r in results if r["failures"]]
    return "\n\n".join([header, speed, quality, *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None, help="folder with pdfs/ and questions.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N files (by name), for development")
    parser.add_argument("--precision", action="append", default=None,
                        help="our embedding precision(s): fp32 | bf16 | onnx | onnx-int8 | auto (repeatable; "
                             "default: auto, then the other of bf16 and onnx-int8 where the CPU has bf16, then fp32)")
    parser.add_argument("--no-langchain", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args()
    dataset = args.dataset or shared_dataset("financebench-dev")
    files = sorted((dataset / "pdfs").glob("*.pdf"))[:args.limit]
    names = {path.stem for path in files}
    questions = [q for q in map(json.loads, (dataset / "questions.jsonl").read_text().splitlines())
                 if q["doc_name"] in names]
    pages = sum(page_count(path) for path in files)

    import torch

    header = (f"{len(files)} files, {pages} pages, {len(questions)} questions; {os.cpu_count()} CPUs "
              f"({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}; "
              f"CPU flags: {cpu_flags()}; bf16 natively: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(header, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-documents-"))
    results = []
    try:
        # LangChain runs between our first and further runs: neither side always gets the quieter machine.
        # Beside auto, the other fast path this CPU has (bf16 needs native bf16; onnx-int8 runs anywhere).
        fast = ["bf16", "onnx-int8"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ["onnx-int8"]
        ours = args.precision or ["auto", *(path for path in fast if path != Embedder().precision), "fp32"]
        for precision in [ours[0], "langchain", *ours[1:]]:
            if precision == "langchain":
                baseline = None if args.no_langchain else run_langchain(files, questions, Embedder().path)
                results += [baseline] if baseline else []
            else:
                results.append(run_ours(files, questions, precision, workdir))
            # Tables so far after every pipeline: a long run that is stopped still leaves its measurements.
            output = tables(header, pages, results)
            print("\n" + output + "\n", flush=True)
            if args.out:
                args.out.write_text(output + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
