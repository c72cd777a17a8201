"""Evaluation: metric functions on hand-checked cases, dataset readers, statistics, refusal of training questions."""

import json

import pytest

from rag.datasets import QAItem, is_gold, read_dataset, write_contexts
from rag.evaluate import (EvalConfig, bootstrap_ci, groundedness, paired_difference, parse_choice,
                          question_hash, refuse_training_questions, sample_items)
from rag.metrics import best_exact_match, best_f1, exact_match, normalize_answer, token_f1
from tests.conftest import DATA


@pytest.mark.parametrize(("raw", "normalised"), [
    ("The Cat!", "cat"),
    ("  a  Denver   Broncos.", "denver broncos"),
    ("Santa Clara, California", "santa clara california"),
    ("the the", ""),
    ("An apple's core", "apples core"),
    ("Theory of the case", "theory of case"),  # 'the' inside words is kept, the article is dropped
])
def test_squad_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_and_f1_hand_checked():
    assert exact_match("The Denver Broncos", "denver broncos") == 1.0
    assert token_f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(0.8)  # p=2/3, r=1
    assert token_f1("Carolina Panthers", "Denver Broncos") == 0.0
    assert token_f1("", "anything") == 0.0
    assert best_exact_match("308", ["three hundred eight", "308 points", "308"]) == 1.0
    assert best_f1("308 points", ["308", "three hundred"]) == pytest.approx(2 / 3)


def test_groundedness_and_choice_parsing():
    assert groundedness("Denver Broncos", "The Denver Broncos defeated the Panthers.") == 1.0
    assert groundedness("Green Bay Packers", "The Denver Broncos defeated the Panthers.") == 0.0
    assert groundedness("the of", "anything") is None  # nothing but stopwords: not scorable
    assert parse_choice("Yes, because the trial showed it.", ["yes", "no", "maybe"]) == "yes"
    assert parse_choice("It is not clear; maybe.", ["yes", "no", "maybe"]) == "maybe"
    assert parse_choice("Uncertain", ["yes", "no", "maybe"]) is None


def test_squad_reader_keeps_gold_passages():
    dataset = read_dataset(DATA / "xquad_sample.json")
    assert len(dataset.passages) == 4 and len(dataset.items) == 12
    item = dataset.items[0]
    assert item.question.endswith("?") and item.answers and item.context
    assert item.gold_sources == ["Super_Bowl_50/p00.txt"] and item.group == "Super_Bowl_50"
    assert item.answers[0] in item.context


def test_pubmedqa_reader_has_choices_and_labels():
    dataset = read_dataset(DATA / "pubmedqa_sample.json")
    assert len(dataset.items) == 6
    assert all(item.choices == ["yes", "no", "maybe"] for item in dataset.items)
    assert [item.answers[0] for item in dataset.items] == ["yes", "yes", "no", "yes", "yes", "no"]
    assert all(len(item.context) > 200 for item in dataset.items)


def test_jsonl_reader_and_bad_records(tmp_path):
    dataset = read_dataset(DATA / "qa_sample.jsonl")
    assert [item.id for item in dataset.items] == ["q1", "q2"]
    assert dataset.items[0].gold_sources == ["timeouts.md"] and len(dataset.items[0].answers) == 2
    assert dataset.items[1].gold_sources and dataset.items[1].context in dataset.passages.values()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n{"answers": ["x"]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_dataset(bad)


def test_contexts_are_written_as_files_that_match_gold_sources(tmp_path):
    dataset = read_dataset(DATA / "xquad_sample.json")
    folder = write_contexts(dataset, tmp_path / "passages")
    files = sorted(str(path) for path in folder.rglob("*.txt"))
    assert len(files) == 4
    assert sum(is_gold(path, dataset.items[0].gold_sources) for path in files) == 1


def test_sample_is_fixed_by_seed():
    dataset = read_dataset(DATA / "xquad_sample.json")
    first, again, other = (sample_items(dataset, 5, seed) for seed in (1, 1, 2))
    assert [i.id for i in first] == [i.id for i in again] != [i.id for i in other]


def test_bootstrap_interval_and_paired_difference():
    values = [1.0] * 60 + [0.0] * 40
    mean, low, high = bootstrap_ci(values, 1000, seed=0)
    assert mean == pytest.approx(0.6) and 0.48 < low < 0.6 < high < 0.72
    better = paired_difference([1.0] * 50, [0.0] * 50, 500, 0)
    assert better["significant"] and better["difference"] == 1.0
    noise = paired_difference([1, 0] * 25, [0, 1] * 25, 500, 0)
    assert not noise["significant"]


def test_training_questions_are_refused(tmp_path):
    dataset = read_dataset(DATA / "xquad_sample.json")
    (tmp_path / "training.json").write_text(json.dumps(
        {"train_question_hashes": [question_hash(dataset.items[0].question.upper() + "  ")]}))
    with pytest.raises(ValueError, match="1 of 12 evaluation questions were in the adapter's training data"):
        refuse_training_questions(dataset.items, tmp_path)
    refuse_training_questions(dataset.items[1:], tmp_path)  # held-out questions are fine


def test_config_fingerprint_changes_with_generation_settings(tmp_path):
    base = EvalConfig(DATA / "qa_sample.jsonl", ["rag"], tmp_path)
    assert base.fingerprint() == EvalConfig(DATA / "qa_sample.jsonl", ["prompt"], tmp_path / "x").fingerprint()
    assert base.fingerprint() != EvalConfig(DATA / "qa_sample.jsonl", ["rag"], tmp_path, max_new_tokens=8).fingerprint()
    other_k = EvalConfig(DATA / "qa_sample.jsonl", ["rag"], tmp_path, k=2)
    assert base.fingerprint() != other_k.fingerprint()  # retrieving paths see other chunks
    assert base.fingerprint(retrieves=False) == other_k.fingerprint(retrieves=False)  # prompt-only answers do not


def test_fingerprint_follows_the_decoder_and_adapter_weights(tmp_path):
    from rag.config import Settings
    from rag.evaluate import answering_models

    adapters = []
    for name, weights in (("a", b"one"), ("b", b"two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(weights)
        adapters.append(Settings(backend="openai", openai_model="m", adapter_dir=tmp_path / name))
    config = EvalConfig(DATA / "qa_sample.jsonl", ["finetuned"], tmp_path)
    tuned = [config.fingerprint(False, answering_models(settings)[1]) for settings in adapters]
    base = [config.fingerprint(False, answering_models(settings)[0]) for settings in adapters]
    assert tuned[0] != tuned[1] and base[0] == base[1]  # a new adapter re-answers; the base path's cache stands
    other_model = Settings(backend="openai", openai_model="bigger")
    assert config.fingerprint(False, answering_models(other_model)[0]) != base[0]


def test_citation_markers_are_not_scored_as_answer_words():
    from rag.evaluate import score_answer

    item = read_dataset(DATA / "xquad_sample.json").items[0]  # gold: "308"
    texts = {7: "The Panthers defense gave up just 308 points.", 9: "Unrelated text about the Broncos."}
    scores = score_answer(item, "308 [2]", [9, 7], texts)
    assert scores["exact_match"] == 1.0 and scores["f1"] == 1.0
    assert scores["citation_precision"] == 1.0 and scores["grounded"] == 1.0
    wrong = score_answer(item, "308 [1]", [9, 7], texts)
    assert wrong["citation_precision"] == 0.0 and wrong["grounded"] == 0.0


@pytest.fixture(scope="module")
def eval_pipeline(tmp_path_factory, embedder, generator):
    from ingest.job import IngestJob
    from rag.config import Settings
    from rag.pipeline import Pipeline
    from rag.retrieve import Retriever
    from rag.store import Store

    root = tmp_path_factory.mktemp("eval")
    settings = Settings(index_dir=root / "index", parse_workers=1)
    IngestJob(settings, embedder).run(write_contexts(read_dataset(DATA / "xquad_sample.json"), root / "passages"))
    return Pipeline(settings, Retriever(Store.open(settings.index_dir, embedder.name), embedder), generator)


@pytest.mark.slow
def test_closed_set_summary_counts_answers_and_balances_accuracy(tmp_path):
    from rag.evaluate import EvalRun, summarize
    from rag.report import write_report

    golds = ["yes"] * 6 + ["no"] * 3 + ["maybe"]
    items = [QAItem(str(n), "q", [gold], choices=["yes", "no", "maybe"]) for n, gold in enumerate(golds)]
    config = EvalConfig(DATA / "pubmedqa_sample.json", ["rag"], tmp_path / "run", bootstrap=50)
    rows = [{"id": item.id, "path": "rag", "gold": item.answers, "answer": "yes", "latency_ms": 1.0,
             "prompt_tokens": 1, "completion_tokens": 0, "tokens_per_second": 0.0,
             "scores": {"accuracy": float(item.answers[0] == "yes"), "predicted": "yes"}} for item in items]
    run = EvalRun(config, rows)
    config.out_dir.mkdir(parents=True)
    run.summary = summarize(run, items)
    rag = run.summary["paths"]["rag"]
    # Always "yes": accuracy equals the majority rate, balanced accuracy shows no signal (1/3).
    assert rag["accuracy"]["mean"] == pytest.approx(0.6) == run.summary["majority_class"]["rate"]
    assert rag["predicted"] == {"yes": 10} and rag["balanced_accuracy"] == pytest.approx(1 / 3)
    assert "| rag | yes 10 | 0.333 |" in (write_report(run, "rag eval").read_text())


def test_interrupted_run_resumes_from_its_cache_and_repeats_exactly(eval_pipeline, tmp_path, monkeypatch):
    from rag.evaluate import Evaluator

    config = EvalConfig(DATA / "xquad_sample.json", ["prompt", "rag"], tmp_path / "run", limit=3, max_new_tokens=8)
    evaluator = Evaluator(eval_pipeline, config)
    calls = []
    real_answer = eval_pipeline.answer

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fourth answer
        calls.append(args)
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(eval_pipeline, "answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluator.run()
    monkeypatch.setattr(eval_pipeline, "answer", lambda *a, **k: calls.append(a) or real_answer(*a, **k))
    first = Evaluator(eval_pipeline, config).run()
    assert len(calls) == 6  # three answers made before the interruption were not made again
    assert len(first.rows) == 6 and {row["path"] for row in first.rows} == {"prompt", "rag"}

    # Temperature 0 and a fixed seed: a fresh run (no cache) gives the same answers and the same numbers.
    again = Evaluator(eval_pipeline, EvalConfig(DATA / "xquad_sample.json", ["prompt", "rag"], tmp_path / "again",
                                                limit=3, max_new_tokens=8)).run()
    assert [row["answer"] for row in again.rows] == [row["answer"] for row in first.rows]
    assert again.summary["paths"] == {
        path: {**entry, "latency_ms": again.summary["paths"][path]["latency_ms"],
               "tokens_per_second": again.summary["paths"][path]["tokens_per_second"]}
        for path, entry in first.summary["paths"].items()}
