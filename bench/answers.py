"""Answers a person can check: does the answer show the evidence page and the reference figure, per answer path?

    .venv/bin/python bench/answers.py [--index DIR] [--split report|tune|all] [--paths finetuned-rag,rag]
        [--howto] [--xquad N] [--out FILE.md]

One process, one run. financebench-dev's filings are ingested with the default settings (into --index when given
and not there yet, so a second run reuses it), then each question of the split is answered on each path and by a
stock LangChain RetrievalQA "stuff" chain over the same index (our retriever as a LangChain retriever, top 4) and
the same decoder (the baseline). Per path:

- evidence page shown: an evidence quote (for LangChain: a source document it was given) is from the gold filing
  and on an evidence page (the dataset's pages are 0-based, ours 1-based);
- figure in evidence / in answer: for questions whose reference answer is a figure, that figure (within 0.5%, or
  the same when rounded to the reference's decimals) appears among the figures of the shown evidence / the answer
  text; either: in one or the other;
- justification figures: the share of the figures of FinanceBench's justification found in the shown evidence;
- abstained: the answer says the sources do not answer.

`--howto` answers bench/data/howto.jsonl (questions on the shipped corpus's httpx docs, each with the section that
answers it and a string of its code or text) on the default path over an index of corpus/: shown = that string is
in the answer or its evidence. `--xquad N` answers N held-out XQuAD questions (articles the adapter never saw) on the
default path over their paragraphs: token F1 of the answer text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, dev_split, markdown_table, mean, publish, shared_dataset  # noqa: E402
from bench.evidence import open_or_ingest  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.datasets import read_dataset, write_contexts  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.generation import GenerationParams, load_generator  # noqa: E402
from rag.index import Index  # noqa: E402
from rag.metrics import best_f1  # noqa: E402
from rag.pipeline import Pipeline  # noqa: E402
from rag.types import DEFAULT_COLLECTION  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
PARAMS = GenerationParams(max_new_tokens=64)
LANGCHAIN_K = 4  # RetrievalQA's retriever default


def figures(text: str) -> list[float]:
    found = []
    for match in NUMBER.findall(text.replace("(", "-").replace("$", "")):
        try:
            found.append(float(match.replace(",", "")))
        except ValueError:
            continue
    return found


def holds_figure(reference: str, text: str) -> bool:
    wanted = figures(reference)
    if not wanted:
        return False
    target = wanted[0]
    first = NUMBER.search(reference.replace("$", ""))
    decimals = len(first.group(0).partition(".")[2]) if first else 0
    return any(abs(abs(value) - abs(target)) <= 0.005 * abs(target) or round(abs(value), decimals) == abs(target)
               for value in figures(text))


def on_gold_page(question: dict, name: str, page: int | None) -> bool:
    pages = {e["page"] + 1 for e in question["evidence"] if e["doc_name"] == question["doc_name"]}
    return Path(name).stem == question["doc_name"] and page in pages


def score(question: dict, answer_text: str, shown: list[tuple[str, int | None, str]], abstained: bool) -> dict:
    """`shown`: (document name, page, text) of each piece of evidence the answer shows."""
    shown_text = "\n".join(text for *_, text in shown)
    is_figure = bool(figures(question["answer"]))
    justification = figures(question.get("justification") or "")
    return {
        "page": any(on_gold_page(question, name, page) for name, page, _ in shown),
        "figure": is_figure,
        "in evidence": is_figure and holds_figure(question["answer"], shown_text),
        "in answer": is_figure and holds_figure(question["answer"], answer_text),
        "justification": (sum(holds_figure(str(value), shown_text) for value in justification) / len(justification)
                          if justification else None),
        "abstained": abstained,
    }


def ours(pipeline: Pipeline, path: str, question: dict) -> dict:
    answer = pipeline.answer(question["question"], path=path, params=PARAMS, collection=DEFAULT_COLLECTION)
    shown = [(e.source, e.page, e.quote + "\n" + e.header) for e in answer.evidence]
    return score(question, answer.text, shown, not answer.answerable)


def langchain_chain(retriever, generator):
    """RetrievalQA with the "stuff" chain, its default prompt, over our retriever and our decoder."""
    from langchain.chains import RetrievalQA
    from langchain_core.language_models.llms import LLM

    class Decoder(LLM):
        @property
        def _llm_type(self) -> str:
            return "rag-service-decoder"

        def _call(self, prompt: str, stop=None, run_manager=None, **kwargs) -> str:
            return generator.generate([{"role": "user", "content": prompt}], PARAMS).text

    return RetrievalQA.from_chain_type(Decoder(), chain_type="stuff", return_source_documents=True,
                                       retriever=retriever.as_langchain(DEFAULT_COLLECTION, k=LANGCHAIN_K))


def langchain_answer(chain, question: dict) -> dict:
    result = chain.invoke({"query": question["question"]})
    shown = [(doc.metadata["source"], doc.metadata.get("page"), doc.page_content)
             for doc in result["source_documents"]]
    return score(question, result["result"], shown, False)


def summary(rows: list[dict]) -> list[str]:
    with_figure = [row for row in rows if row["figure"]]
    justified = [row["justification"] for row in rows if row["justification"] is not None]
    return [len(rows), f"{mean([row['page'] for row in rows]):.3f}",
            f"{mean([row['in evidence'] for row in with_figure]):.3f}",
            f"{mean([row['in answer'] for row in with_figure]):.3f}",
            f"{mean([row['in evidence'] or row['in answer'] for row in with_figure]):.3f}",
            f"{mean(justified):.3f}" if justified else "", f"{mean([row['abstained'] for row in rows]):.3f}"]


def howto(settings: Settings, embedder: Embedder, generator, workdir: Path) -> list[list]:
    index_settings = Settings(index_dir=workdir / "corpus-index")
    IngestJob(index_settings, embedder).run(ROOT / "corpus")
    pipeline = Pipeline(index_settings, Index.open(index_settings, embedder.name).retriever(embedder), generator)
    shown = abstained = 0
    items = [json.loads(line) for line in (ROOT / "bench" / "data" / "howto.jsonl").read_text().splitlines()]
    misses = []
    for item in items:
        answer = pipeline.answer(item["question"], path=settings.default_path, params=PARAMS,
                                 collection=DEFAULT_COLLECTION)
        texts = [answer.text, *(e.quote for e in answer.evidence)]
        found = any(item["expect"] in text for text in texts)
        shown += found
        abstained += not answer.answerable
        if not found:
            misses.append(item["question"])
    print("how-to misses:", misses, file=sys.stderr)
    return [[f"how-to (corpus/httpx, {settings.default_path.value} path)", len(items), f"{shown / len(items):.3f}",
             f"{abstained / len(items):.3f}"]]


def xquad_f1(settings: Settings, embedder: Embedder, generator, workdir: Path, limit: int) -> list[list]:
    record = json.loads((ROOT / "rag" / "data" / "adapter" / "training.json").read_text())
    heldout = set(record["split"]["heldout_ids"])
    dataset = read_dataset(shared_dataset("xquad-en/xquad.en.json"))
    items = [item for item in dataset.items if item.id in heldout][:limit]
    index_settings = Settings(index_dir=workdir / "xquad-index")
    IngestJob(index_settings, embedder).run(write_contexts(dataset, workdir / "xquad"))
    pipeline = Pipeline(index_settings, Index.open(index_settings, embedder.name).retriever(embedder), generator)
    scores = [best_f1(pipeline.answer(item.question, path=settings.default_path, params=PARAMS,
                                      collection=DEFAULT_COLLECTION).text, item.answers) for item in items]
    return [[f"XQuAD held-out ({settings.default_path.value} path)", len(items), f"{mean(scores):.3f}", ""]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=None)
    parser.add_argument("--split", choices=("report", "tune", "all"), default="all")
    parser.add_argument("--paths", default="finetuned-rag,rag")
    parser.add_argument("--no-langchain", action="store_true")
    parser.add_argument("--howto", action="store_true")
    parser.add_argument("--xquad", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    dataset = shared_dataset("financebench-dev")
    questions = [json.loads(line) for line in (dataset / "questions.jsonl").read_text().splitlines() if line.strip()]
    embedder = Embedder()
    settings = Settings()
    generator = load_generator(settings)
    output = [f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), flags: {cpu_flags()}; "
              f"embedding {embedder.precision}; load average {os.getloadavg()[0]:.1f}", ""]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rag-answers-") as scratch:
        retriever, _ = open_or_ingest(sorted((dataset / "pdfs").glob("*.pdf")), args.index or Path(scratch) / "filings",
                                      embedder)
        pipeline = Pipeline(settings, retriever, generator)
        splits = ("report", "tune") if args.split == "all" else (args.split,)
        rows = []
        paths = [path for path in args.paths.split(",") if path]  # "": only --howto / --xquad
        runs = {path: {} for path in paths}
        chain = None if args.no_langchain else langchain_chain(retriever, generator)
        for question in questions:
            half = dev_split(question["doc_name"])
            if half not in splits:
                continue
            for path in paths:
                runs[path].setdefault(half, []).append(ours(pipeline, path, question))
            if chain is not None:
                runs.setdefault("LangChain RetrievalQA (stuff)", {}).setdefault(half, []).append(
                    langchain_answer(chain, question))
        for path, by_split in runs.items():
            for half in splits:
                rows.append([path, half, *summary(by_split.get(half, []))])
        output.append(markdown_table(["path", "split", "questions", "evidence page shown", "figure in evidence",
                                      "figure in answer", "figure in either", "justification figures shown",
                                      "abstained"], rows))
        extra = []
        if args.howto:
            extra += howto(settings, embedder, generator, Path(scratch))
        if args.xquad:
            extra += xquad_f1(settings, embedder, generator, Path(scratch), args.xquad)
        if extra:
            output += ["", markdown_table(["set", "questions", "shown / F1", "abstained"], extra)]
    output += ["", f"{time.perf_counter() - started:.0f} s"]
    publish(output, args.out)


if __name__ == "__main__":
    main()
