"""Abstention: is a question the index cannot answer called "not answerable", and an answerable one not?

    .venv/bin/python bench/abstention.py [--fit] [--out results/abstention]

XQuAD is split by article exactly as the shipped adapter was trained (`rag.finetune.split_by_group`, hold-out
0.5, validation 0.1, seed 0). Three indexes are built: all 240 paragraphs, the training articles' paragraphs only,
and the held-out articles' paragraphs only.

- `--fit` (calibration, development data): the training articles' questions asked of all paragraphs (answerable)
  and of the held-out articles' paragraphs (not answerable); fits `rag/data/answerability.json`, with the
  threshold set for at most `--max-false-abstention` on these answerable questions.
- evaluation (always): the held-out articles' questions asked of all paragraphs (answerable) and of the training
  articles' paragraphs (not answerable), and PubMedQA questions asked of the shipped httpx docs (not answerable).
  Rates with percentile-bootstrap 95% intervals; `report.md` and `results.json` in `--out`.

Retrieval is the answer pipeline's: hybrid, `answer_chunks` sources. The F1 cost of abstaining on answerable
questions needs generated answers, so it is measured by `rag eval` (its report's abstention columns).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import cpu_flags, markdown_table, shared_dataset  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from rag.answerability import DEFAULT_MODEL_FILE, FEATURES, AnswerabilityModel, answerability_features  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.datasets import Dataset, read_dataset, write_contexts  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.evaluate import bootstrap_ci  # noqa: E402
from rag.finetune import split_by_group  # noqa: E402
from rag.models import sha256_files  # noqa: E402
from rag.retrieve import Retriever  # noqa: E402
from rag.store import Store  # noqa: E402
from rag.types import DEFAULT_COLLECTION  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLIT = {"holdout_fraction": 0.5, "validation_fraction": 0.1, "seed": 0}  # the shipped adapter's split


def build_index(passages: dict[str, str], folder: Path, embedder: Embedder) -> Retriever:
    write_contexts(Dataset("passages", [], passages), folder / "passages")
    IngestJob(Settings(index_dir=folder / "index"), embedder).run(folder / "passages")
    return Retriever(Store.open(folder / "index", embedder.name), embedder)


def features_for(retriever: Retriever, questions: list[str], k: int) -> np.ndarray:
    rows = []
    for question in questions:
        hits = retriever.retrieve(question, k, collection=DEFAULT_COLLECTION)
        similarities = retriever.similarities(question, hits, collection=DEFAULT_COLLECTION)
        found = answerability_features(question, hits, similarities)
        rows.append([found[name] for name in FEATURES])
    return np.asarray(rows)


def fit(positive: np.ndarray, negative: np.ndarray, max_false_abstention: float, record: dict) -> AnswerabilityModel:
    from sklearn.linear_model import LogisticRegression

    X = np.vstack([positive, negative])
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    regression = LogisticRegression().fit(X, y)
    model = AnswerabilityModel(dict(zip(FEATURES, map(float, regression.coef_[0]))), float(regression.intercept_[0]),
                               0.5, record)
    confidences = np.sort([model.confidence(dict(zip(FEATURES, row))) for row in positive])
    # The highest threshold that abstains on at most the allowed share of the calibration's answerable questions.
    threshold = float(confidences[int(np.floor(max_false_abstention * len(confidences)))])
    return AnswerabilityModel(model.weights, model.bias, round(threshold - 1e-6, 6), record)


def rates(model: AnswerabilityModel, rows: np.ndarray) -> list[float]:
    """1.0 where the question is called not answerable."""
    return [float(not model.assess(dict(zip(FEATURES, row))).answerable) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help=f"refit {DEFAULT_MODEL_FILE.relative_to(ROOT)}")
    parser.add_argument("--max-false-abstention", type=float, default=0.03)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "abstention")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = Settings()
    k = settings.prompt_chunks
    xquad_path = shared_dataset("xquad-en/xquad.en.json")
    xquad = read_dataset(xquad_path)
    split = split_by_group(xquad.items, **SPLIT)
    training_items = split.train + split.validation
    heldout_keys = {key for item in split.heldout for key in item.gold_sources}
    heldout_passages = {key: xquad.passages[key] for key in heldout_keys}
    training_passages = {key: text for key, text in xquad.passages.items() if key not in heldout_keys}

    embedder = Embedder.from_settings(settings)
    work = Path(tempfile.mkdtemp(prefix="bench-abstention-"))
    every = build_index(xquad.passages, work / "all", embedder)
    heldout_only = build_index(heldout_passages, work / "heldout", embedder)
    training_only = build_index(training_passages, work / "training", embedder)

    if args.fit:
        questions = [item.question for item in training_items]
        record = {"data": {"path": str(xquad_path.name), "sha256": sha256_files(xquad_path)},
                  "split": SPLIT, "questions": len(questions), "k": k, "retriever": "hybrid",
                  "embedding_model": embedder.name, "max_false_abstention": args.max_false_abstention,
                  "command": "bench/abstention.py --fit"}
        model = fit(features_for(every, questions, k), features_for(heldout_only, questions, k),
                    args.max_false_abstention, record)
        model.save(DEFAULT_MODEL_FILE)
        print(f"fitted {DEFAULT_MODEL_FILE.relative_to(ROOT)}: {model.weights}, bias {model.bias:.3f}, "
              f"threshold {model.threshold:.3f}", file=sys.stderr)
    model = AnswerabilityModel.load()

    heldout_questions = [item.question for item in split.heldout]
    pubmedqa = read_dataset(shared_dataset("pubmedqa-dev/pqal_dev.json"))
    httpx_docs = Retriever(_index_of(ROOT / "corpus" / "httpx", work / "httpx", embedder), embedder)
    sets = [
        ("XQuAD held-out articles, all paragraphs indexed", "answerable", features_for(every, heldout_questions, k)),
        ("XQuAD held-out articles, their articles not indexed", "not answerable",
         features_for(training_only, heldout_questions, k)),
        ("PubMedQA questions, httpx docs indexed", "not answerable",
         features_for(httpx_docs, [item.question for item in pubmedqa.items], k)),
    ]
    rows, results = [], {"threshold": model.threshold, "weights": model.weights, "bias": model.bias, "sets": []}
    for name, truth, feature_rows in sets:
        abstained = rates(model, feature_rows)
        mean, low, high = bootstrap_ci(abstained, 2000, args.seed)
        measure = "false abstention (target ≤ 0.05)" if truth == "answerable" else "abstention (target ≥ 0.80)"
        rows.append([name, truth, len(abstained), measure, f"{mean:.3f} [{low:.3f}, {high:.3f}]"])
        results["sets"].append({"name": name, "truth": truth, "n": len(abstained), "not_answerable_rate": mean,
                                "ci95": [low, high]})
    table = markdown_table(["questions", "truth", "n", "measure", "called not answerable [95% CI]"], rows)
    note = (f"Threshold {model.threshold:.3f} on the calibrated confidence (weights {model.weights}, bias "
            f"{model.bias:.3f}); hybrid retrieval, k = {k}; {embedder.name} ({embedder.precision}); "
            f"{platform.machine()}, CPU flags: {cpu_flags()}.")
    print(table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(f"# Abstention\n\n{__doc__.strip()}\n\n{table}\n\n{note}\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def _index_of(folder: Path, work: Path, embedder: Embedder) -> Store:
    IngestJob(Settings(index_dir=work / "index"), embedder).run(folder)
    return Store.open(work / "index", embedder.name)


if __name__ == "__main__":
    main()
