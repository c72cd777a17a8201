"""Evidence pages: does retrieval put the page that holds the answer first, per stage (dense, BM25, hybrid, reranked)?

    .venv/bin/python bench/evidence.py [--dataset ../shared/datasets/financebench-dev] [--split report|tune|all]
        [--index DIR] [--xquad] [--pubmedqa] [--rerank-passages] [--out FILE.md]

financebench-dev's filings are ingested with the default settings (into --index when given and not there yet, so
that a second run reuses it; else a temporary folder), then every question of the split is asked of each stage.
The split is `bench.common.dev_split` by filing: the reranker is trained and settings are tuned on "tune"; report on
"report" (the default), which nothing was tuned on.

Per question, the ranked chunks (top 10) are read as (filing, pages covered): evidence-page hit@k = one of the first
k chunks is from the gold filing and covers an evidence page (the dataset's pages are 0-based, ours 1-based; a chunk
that spans a page break covers both); MRR over the first 10. Document hit@1 = the first chunk's filing is the gold
one. `--xquad` / `--pubmedqa` add recall@1 of the gold passage on those sets (each passage a document) with the default
retrieval (and, with `--rerank-passages`, reranked), to show the changes cost nothing elsewhere. Latency: ms per query of the whole
`Retriever.retrieve` call; the reranker's share is printed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, dev_split, markdown_table, publish, percentile, shared_dataset  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.datasets import is_gold, read_dataset, write_contexts  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.index import Index  # noqa: E402
from rag.retrieve import Retriever, RetrieverKind  # noqa: E402
from rag.types import DEFAULT_COLLECTION  # noqa: E402

DEPTH = 10
STAGES = ("dense", "bm25", "hybrid", "reranked")


def pages_of(chunk) -> range:
    return range(chunk.page or 0, (chunk.page_end or chunk.page or 0) + 1)


def score(rankings: list[list], questions: list[dict]) -> dict[str, float]:
    """rankings[i]: the chunks retrieved for question i, best first."""
    doc1 = hit1 = hit5 = reciprocal = 0.0
    for ranked, question in zip(rankings, questions):
        gold_pages = {e["page"] + 1 for e in question["evidence"] if e["doc_name"] == question["doc_name"]}
        names = [Path(chunk.source).stem for chunk in ranked]
        doc1 += bool(names) and names[0] == question["doc_name"]
        on_page = [name == question["doc_name"] and bool(gold_pages.intersection(pages_of(chunk)))
                   for name, chunk in zip(names, ranked)]
        hit1 += any(on_page[:1])
        hit5 += any(on_page[:5])
        reciprocal += next((1 / (rank + 1) for rank, hit in enumerate(on_page) if hit), 0.0)
    n = len(questions) or 1
    return {"doc hit@1": doc1 / n, "page hit@1": hit1 / n, "page hit@5": hit5 / n, "page MRR@10": reciprocal / n}


def ask(retriever: Retriever, stage: str, question: str):
    kind = RetrieverKind.HYBRID if stage == "reranked" else RetrieverKind(stage)
    return retriever.retrieve(question, DEPTH, kind, collection=DEFAULT_COLLECTION, rerank=stage == "reranked")


def measure(retriever: Retriever, questions: list[dict]) -> list[list]:
    rows = []
    for stage in STAGES:
        rankings, seconds = [], []
        rerank_ms = retriever.rerank_seconds
        for question in questions:
            started = time.perf_counter()
            hits = ask(retriever, stage, question["question"])
            seconds.append(time.perf_counter() - started)
            rankings.append([hit.chunk for hit in hits])
        scores = score(rankings, questions)
        rerank_ms = (retriever.rerank_seconds - rerank_ms) * 1000 / max(len(questions), 1)
        rows.append([stage, *(f"{value:.3f}" for value in scores.values()),
                     f"{percentile(seconds, 50) * 1000:.0f}", f"{percentile(seconds, 95) * 1000:.0f}",
                     f"{rerank_ms:.0f}" if stage == "reranked" else ""])
    return rows


def open_or_ingest(files: list[Path], index_dir: Path, embedder: Embedder) -> tuple[Retriever, float | None]:
    settings = Settings(index_dir=index_dir, rerank=True)  # the "reranked" stage needs the reranker
    ingest_seconds = None
    if not (index_dir / "index.json").exists() and not any(index_dir.glob("*")):
        corpus = index_dir.parent / f"{index_dir.name}-corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        for path in files:
            if not (corpus / path.name).exists():
                (corpus / path.name).symlink_to(path)
        report = IngestJob(settings, embedder).run(corpus, follow_links=True)
        if report.failed:
            sys.exit("ingestion failed: " + "; ".join(f"{Path(r.source).name}: {r.error}" for r in report.failed))
        ingest_seconds = report.total_seconds
    return Index.open(settings, embedder.name).retriever(embedder), ingest_seconds


def passage_recall(path: Path, workdir: Path, embedder: Embedder, rerank: bool) -> list[list]:
    """recall@1 of the gold passage, hybrid (and reranked), on a passage-per-document set (XQuAD, PubMedQA)."""
    dataset = read_dataset(path)
    settings = Settings(index_dir=workdir / "index")
    IngestJob(settings, embedder).run(write_contexts(dataset, workdir / "passages"))
    retriever = Index.open(settings, embedder.name).retriever(embedder)
    rows = []
    for stage in ("hybrid", "reranked") if rerank else ("hybrid",):
        found, seconds = 0, []
        for item in dataset.items:
            started = time.perf_counter()
            hits = retriever.retrieve(item.question, 1, RetrieverKind.HYBRID, collection=DEFAULT_COLLECTION,
                                      rerank=stage == "reranked")
            seconds.append(time.perf_counter() - started)
            found += bool(hits) and is_gold(hits[0].chunk.source, item.gold_sources)
        rows.append([path.parent.name, stage, len(dataset.items), f"{found / len(dataset.items):.3f}",
                     f"{percentile(seconds, 50) * 1000:.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--split", choices=("report", "tune", "all"), default="report")
    parser.add_argument("--index", type=Path, default=None, help="reuse (or create) the filings' index here")
    parser.add_argument("--xquad", action="store_true")
    parser.add_argument("--pubmedqa", action="store_true")
    parser.add_argument("--rerank-passages", action="store_true",
                        help="also the reranked stage on --xquad/--pubmedqa (~2.5 s a question on 2 busy cores)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    dataset = args.dataset or shared_dataset("financebench-dev")
    questions = [json.loads(line) for line in (dataset / "questions.jsonl").read_text().splitlines() if line.strip()]
    questions = [q for q in questions if args.split == "all" or dev_split(q["doc_name"]) == args.split]
    files = sorted((dataset / "pdfs").glob("*.pdf"))
    embedder = Embedder()
    output = [f"{len(files)} filings, {len(questions)} questions (split: {args.split}); {os.cpu_count()} CPUs "
              f"({platform.processor() or platform.machine()}), flags: {cpu_flags()}; embedding {embedder.precision}; "
              f"load average {os.getloadavg()[0]:.1f}", ""]
    with tempfile.TemporaryDirectory(prefix="rag-evidence-") as scratch:
        retriever, ingest_seconds = open_or_ingest(files, args.index or Path(scratch) / "filings", embedder)
        if ingest_seconds is not None:
            output += [f"ingest: {ingest_seconds:.1f} s", ""]
        output.append(markdown_table(["stage", "doc hit@1", "page hit@1", "page hit@5", "page MRR@10", "p50 ms",
                                      "p95 ms", "rerank ms/query"], measure(retriever, questions)))
        extra = []
        if args.xquad:
            extra += passage_recall(shared_dataset("xquad-en/xquad.en.json"), Path(scratch) / "xquad", embedder,
                                    args.rerank_passages)
        if args.pubmedqa:
            extra += passage_recall(shared_dataset("pubmedqa-dev/pqal_dev.json"), Path(scratch) / "pubmedqa",
                                    embedder, args.rerank_passages)
        if extra:
            output += ["", markdown_table(["set", "stage", "questions", "recall@1", "p50 ms"], extra)]
    publish(output, args.out)


if __name__ == "__main__":
    main()
