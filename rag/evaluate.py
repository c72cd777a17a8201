"""`rag eval`: answer a QA dataset on several paths and score retrieval, answers, grounding, cost and speed.

Every (path, question) result is appended to `cache.jsonl` as soon as it exists, so an interrupted run resumes
where it stopped; `results.json` and `report.md` (with plots) are written from the cache at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag.config import DEFAULT_SEARCH_RESULTS
from rag.datasets import Dataset, QAItem, is_gold, read_dataset
from rag.errors import UserError
from rag.generation.base import DEFAULT_MAX_NEW_TOKENS
from rag.metrics import balanced_accuracy, best_exact_match, best_f1, normalize_answer, question_hash
from rag.models import TRAINING_RECORD, decoder_identity, sha256_files
from rag.pipeline import CITATION, AnswerPath, Pipeline, quote_source, quoted
from rag.span import grounded_share as groundedness
from rag.types import DEFAULT_COLLECTION, RetrieverKind

RETRIEVAL_KS = (1, 3, 5, 10)
GROUNDED_SHARE = 0.8  # an answer is grounded when this share of its content words occurs in its context


@dataclass(slots=True)
class EvalConfig:
    dataset: Path
    paths: list[str]
    out_dir: Path
    limit: int | None = None
    seed: int = 0
    k: int = DEFAULT_SEARCH_RESULTS
    retriever: str = RetrieverKind.HYBRID.value
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    bootstrap: int = 1000
    collection: str = DEFAULT_COLLECTION  # retrieved from; recorded in results.json (GET /v1/evals scopes by it)

    def fingerprint(self, retrieves: bool = True, models: dict[str, str] | None = None) -> str:
        """Identity of the settings that change a path's answers; a result cached with other settings is not
        reused. Retrieval settings only matter to the paths that retrieve; `models` names the decoder (and adapter)
        that answered."""
        # The collection in every fingerprint: the retrieval rows (every retriever, whatever the paths) depend on it.
        names = ("max_new_tokens", "temperature", "seed", "collection") + (("k", "retriever") if retrieves else ())
        key = {name: value for name, value in asdict(self).items() if name in names} | (models or {})
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def answering_models(settings) -> tuple[dict[str, str], dict[str, str]]:
    """Content identity of the models behind the base and the fine-tuned paths' answers: the decoder's weights (or
    the server and model name), plus the adapter's weights, so a new adapter or decoder is never served a stale
    cache. Each file is hashed once."""
    if settings.backend == "openai":
        base = {"decoder": f"{settings.openai_base_url} {settings.openai_model}"}
    else:
        base = {"decoder": decoder_identity(settings.decoder_model)["sha256"]}
    tuned = dict(base)
    if settings.adapter:
        tuned["adapter"] = sha256_files(*sorted(Path(settings.adapter).glob("*.safetensors")))
    return base, tuned


def sample_items(dataset: Dataset, limit: int | None, seed: int) -> list[QAItem]:
    """A fixed-seed sample, kept in dataset order, so two runs with one seed score the same questions.

    Samples are nested (the first `limit` of one seeded shuffle): a larger limit extends a smaller run's cache.
    """
    if not limit or limit >= len(dataset.items):
        return list(dataset.items)
    order = list(range(len(dataset.items)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:limit])
    return [item for index, item in enumerate(dataset.items) if index in chosen]


def refuse_training_questions(items: list[QAItem], adapter_dir: Path | None) -> None:
    """Scoring a fine-tuned model on questions it was trained on would report memory, not skill."""
    if adapter_dir is None or not (Path(adapter_dir) / TRAINING_RECORD).exists():
        return
    record = json.loads((Path(adapter_dir) / TRAINING_RECORD).read_text())
    trained = set(record.get("train_question_hashes", [])) | set(record.get("validation_question_hashes", []))
    overlap = [item.id for item in items if question_hash(item.question) in trained]
    if overlap:
        raise UserError(
            f"{len(overlap)} of {len(items)} evaluation questions were in the adapter's training data "
            f"(e.g. {overlap[:3]}); evaluate on the held-out split recorded in {Path(adapter_dir) / TRAINING_RECORD}."
        )


# ----------------------------------------------------------------------------------------------- metrics per item
def parse_choice(text: str, choices: list[str]) -> str | None:
    """The first choice word the answer says ('Yes, because…' → yes); None when it names none."""
    words = normalize_answer(text).split()
    for word in words:
        if word in choices:
            return word
    return None


def retrieval_ranks(pipeline: Pipeline, item: QAItem, kinds: list[str], depth: int,
                    collection: str) -> dict[str, int | None]:
    ranks = {}
    for kind in kinds:
        hits = pipeline.retriever.retrieve(item.question, depth, kind, collection=collection)
        ranks[kind] = next((hit.rank for hit in hits if is_gold(hit.chunk.source, item.gold_sources)), None)
    return ranks


def score_answer(item: QAItem, text: str, source_ids: list[int], chunk_texts: dict[int, str]) -> dict:
    """Scores of one answer. Its `[n]` markers cite `source_ids[n - 1]` (the prompt's sources, in rank order);
    `chunk_texts` maps those chunk ids to their text. Markers are not part of the answer that is scored."""
    if item.choices:
        predicted = parse_choice(text, item.choices)
        return {"accuracy": float(predicted == item.answers[0]), "predicted": predicted}
    from rouge_score import rouge_scorer

    cited = [source_ids[n - 1] for n in map(int, CITATION.findall(text)) if 1 <= n <= len(source_ids)]
    plain = CITATION.sub("", text).strip()
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores: dict[str, float | None] = {
        "exact_match": best_exact_match(plain, item.answers),
        "f1": best_f1(plain, item.answers),
        "rouge_l": max(scorer.score(gold, plain)["rougeL"].fmeasure for gold in item.answers),
        "grounded": None,
        "citation_precision": None,
    }
    if source_ids:
        # Grounded: the answer's content words occur in what it cites (or, citing nothing, in what it was shown).
        share = groundedness(plain, "\n".join(chunk_texts.get(i, "") for i in (cited or source_ids)))
        scores["grounded"] = None if share is None else float(share >= GROUNDED_SHARE)
    if cited:
        golds = [normalize_answer(gold) for gold in item.answers if normalize_answer(gold)]
        holds_answer = [any(gold in normalize_answer(chunk_texts.get(i, "")) for gold in golds) for i in cited]
        scores["citation_precision"] = sum(holds_answer) / len(holds_answer)
    return scores


# ----------------------------------------------------------------------------------------------- statistics
def bootstrap_ci(values: list[float], resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap 95% interval."""
    if not values:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return (sum(values) / n, means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))])


def paired_difference(a: list[float], b: list[float], resamples: int, seed: int) -> dict:
    """Mean of a − b over the same questions, with a paired-bootstrap 95% interval; within noise if it spans 0."""
    differences = [x - y for x, y in zip(a, b)]
    mean, low, high = bootstrap_ci(differences, resamples, seed)
    return {"difference": mean, "ci95": [low, high], "significant": not (low <= 0 <= high)}


# ----------------------------------------------------------------------------------------------- the run
@dataclass(slots=True)
class EvalRun:
    config: EvalConfig
    rows: list[dict] = field(default_factory=list)  # one per (path, question)
    retrieval: list[dict] = field(default_factory=list)  # one per question
    summary: dict = field(default_factory=dict)


class Evaluator:
    def __init__(self, pipeline: Pipeline, config: EvalConfig):
        # Every question is answered, abstention or not, and its answerability confidence recorded: the report
        # then shows the scores both without and with abstention (what it costs on answerable questions).
        pipeline.settings = pipeline.settings.model_copy(update={"abstain": False})
        self.pipeline = pipeline
        self.config = config
        self.cache_path = config.out_dir / "cache.jsonl"

    def _load_cache(self) -> dict[tuple[str, str], dict]:
        cached = {}
        if self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the interruption
                    continue
                cached[(row["kind"], row["key"], row.get("fingerprint"))] = row
        return cached

    def run(self, on_progress: Callable[[int, int], None] | None = None) -> EvalRun:
        config = self.config
        config.out_dir.mkdir(parents=True, exist_ok=True)
        dataset = read_dataset(config.dataset)
        items = sample_items(dataset, config.limit, config.seed)
        paths = [AnswerPath.parse(path) for path in config.paths]
        if any(path.finetuned for path in paths):
            refuse_training_questions(items, self.pipeline.settings.adapter)
        cached = self._load_cache()
        base_models, tuned_models = answering_models(self.pipeline.settings)
        fingerprints = {path: config.fingerprint(path.retrieves, tuned_models if path.finetuned else base_models)
                        for path in paths}
        has_gold = any(item.gold_sources for item in items) and any(path.retrieves for path in paths)
        total = len(items) * (len(paths) + int(has_gold))
        done = 0
        run = EvalRun(config)
        with open(self.cache_path, "a") as cache:
            def record(kind: str, key: str, compute: Callable[[], dict], fingerprint: str) -> dict:
                nonlocal done
                row = cached.get((kind, key, fingerprint))
                if row is None:
                    row = {"kind": kind, "key": key, "fingerprint": fingerprint, **compute()}
                    cache.write(json.dumps(row) + "\n")
                    cache.flush()
                done += 1
                if on_progress:
                    on_progress(done, total)
                return row

            for item in items:
                if has_gold:
                    run.retrieval.append(record("retrieval", item.id, lambda: {
                        "id": item.id, "ranks": retrieval_ranks(self.pipeline, item, ["dense", "bm25", "hybrid"], 10,
                                                             config.collection)},
                        config.fingerprint(retrieves=False)))  # every retriever to depth 10, whatever the paths use
                for path in paths:
                    row = record("answer", f"{path.value}:{item.id}", lambda: self._answer(item, path),
                                 fingerprints[path])
                    # Quoted and scored here, not cached: a change of span alignment or of a metric re-scores a
                    # finished run without regenerating.
                    run.rows.append(self._score(item, path, row))
        threshold = self.pipeline.settings.answerable_threshold
        run.summary = summarize(run, items, self.pipeline.answerability_model.threshold if threshold is None
                                else threshold)
        return run

    def _answer(self, item: QAItem, path: AnswerPath) -> dict:
        from rag.generation import GenerationParams

        params = GenerationParams(max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                                  seed=self.config.seed)
        started = time.perf_counter()
        answer = self.pipeline.answer(item.question, path=path, k=self.config.k, retriever=self.config.retriever,
                                      params=params, choices=item.choices, collection=self.config.collection)
        latency_ms = (time.perf_counter() - started) * 1000
        return {
            "id": item.id, "path": path.value, "question": item.question, "gold": item.answers,
            "answer": answer.text, "raw_answer": answer.raw_text,
            "citations": [c.source for c in answer.citations], "source_ids": [s.chunk_id for s in answer.sources],
            "latency_ms": latency_ms, "prompt_tokens": answer.usage.get("prompt_tokens", 0),
            "completion_tokens": answer.usage.get("completion_tokens", 0),
            "tokens_per_second": answer.timings.get("tokens_per_second", 0.0),
            "confidence": answer.confidence,
        }

    def _score(self, item: QAItem, path: AnswerPath, row: dict) -> dict:
        """The row with its answer re-quoted from the cached raw output and its scores."""
        source_ids = row["source_ids"]  # every cached row has them: rows from before carry another fingerprint
        store = self.pipeline.retriever.store
        chunk_texts = ({chunk.id: chunk.text for chunk in store.get(source_ids, collection=self.config.collection)}
                       if source_ids else {})
        answer = row["answer"]
        if source_ids and not item.choices and "don't know" not in row["raw_answer"].lower():
            match = quote_source(row["raw_answer"], item.question, [chunk_texts.get(i, "") for i in source_ids])
            answer = quoted(match) if match else (row["raw_answer"] or row["answer"])
        return {**row, "answer": answer, "scores": score_answer(item, answer, source_ids, chunk_texts)}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _abstention(rows: list[dict], threshold: float, config) -> dict:
    """Share of questions called not answerable, and F1 when those answers score 0 (every eval question has a gold
    answer, so each abstention is a false one and its F1 is what abstaining costs)."""
    abstained = [float(row["confidence"] < threshold) for row in rows]
    f1 = [row["scores"]["f1"] for row in rows]
    kept = [score * (1 - gave_up) for score, gave_up in zip(f1, abstained)]
    rate, rate_low, rate_high = bootstrap_ci(abstained, config.bootstrap, config.seed)
    mean, low, high = bootstrap_ci(kept, config.bootstrap, config.seed)
    return {"threshold": threshold, "false_abstention": {"mean": rate, "ci95": [rate_low, rate_high], "n": len(rows)},
            "f1": {"mean": mean, "ci95": [low, high], "n": len(rows)},
            "f1_drop": sum(f1) / len(f1) - sum(kept) / len(kept)}


def summarize(run: EvalRun, items: list[QAItem], answerable_threshold: float | None = None) -> dict:
    """Headline numbers per path (with bootstrap intervals), paired comparisons, retrieval metrics and, for paths
    whose answers carry an answerability confidence, what abstaining below `answerable_threshold` would do."""
    config = run.config
    by_path: dict[str, list[dict]] = {}
    for row in run.rows:
        by_path.setdefault(row["path"], []).append(row)
    metric_names = ["accuracy"] if items and items[0].choices else ["exact_match", "f1", "rouge_l", "grounded",
                                                                     "citation_precision"]
    paths = {}
    for path, rows in by_path.items():
        entry = {"questions": len(rows)}
        for metric in metric_names:
            values = [row["scores"][metric] for row in rows if row["scores"].get(metric) is not None]
            mean, low, high = bootstrap_ci(values, config.bootstrap, config.seed)
            entry[metric] = {"mean": mean, "ci95": [low, high], "n": len(values)}
        latencies = [row["latency_ms"] for row in rows]
        entry["latency_ms"] = {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95)}
        entry["prompt_tokens"] = sum(row["prompt_tokens"] for row in rows) / len(rows)
        entry["completion_tokens"] = sum(row["completion_tokens"] for row in rows) / len(rows)
        rates = [row["tokens_per_second"] for row in rows if row["tokens_per_second"]]
        entry["tokens_per_second"] = sum(rates) / len(rates) if rates else 0.0
        if metric_names == ["accuracy"]:  # which labels a path gives, and whether it beats a constant answer
            predicted = [row["scores"]["predicted"] for row in rows]
            entry["predicted"] = dict(sorted(Counter(predicted).items()))
            entry["balanced_accuracy"] = balanced_accuracy([row["gold"][0] for row in rows], predicted)
        confidences = [row.get("confidence") for row in rows]
        if answerable_threshold is not None and metric_names != ["accuracy"] and None not in confidences:
            entry["abstention"] = _abstention(rows, answerable_threshold, config)
        paths[path] = entry

    headline = metric_names[0] if metric_names == ["accuracy"] else "f1"
    comparisons = []
    names = list(by_path)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a = {row["id"]: row["scores"][headline] for row in by_path[first]}
            b = {row["id"]: row["scores"][headline] for row in by_path[second]}
            shared = [key for key in a if key in b]
            comparisons.append({"a": first, "b": second, "metric": headline, "questions": len(shared),
                                **paired_difference([a[k] for k in shared], [b[k] for k in shared],
                                                    config.bootstrap, config.seed)})
    summary = {"dataset": str(config.dataset), "questions": len(items), "paths": paths, "comparisons": comparisons,
               "headline_metric": headline}
    if items and items[0].choices:
        golds = [item.answers[0] for item in items]
        majority = max(set(golds), key=golds.count)
        summary["majority_class"] = {"label": majority, "rate": golds.count(majority) / len(golds)}
    if run.retrieval:
        retrieval = {}
        for kind in ("dense", "bm25", "hybrid"):
            ranks = [row["ranks"].get(kind) for row in run.retrieval]
            n = len(ranks)
            retrieval[kind] = {
                **{f"recall@{k}": sum(1 for r in ranks if r and r <= k) / n for k in RETRIEVAL_KS},
                "mrr": sum(1 / r for r in ranks if r) / n,
                # One gold passage per question: ideal DCG is 1, so nDCG@10 is 1/log2(rank + 1).
                "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r and r <= 10) / n,
            }
        summary["retrieval"] = retrieval
    return summary
