"""Fine-tuning: loss goes down, the adapter reloads and changes the model, splits stay disjoint."""

import json
import random

import pytest

from rag.datasets import read_dataset
from rag.finetune import FinetuneConfig, _batches, finetune, split_by_group
from tests.conftest import DATA

pytestmark = pytest.mark.slow


def test_splits_are_disjoint_by_group():
    dataset = read_dataset(DATA / "pubmedqa_sample.json")  # 6 abstracts, one group each
    split = split_by_group(dataset.items, 0.34, 0.5, seed=0)
    groups = [{item.group for item in part} for part in (split.train, split.validation, split.heldout)]
    assert all(groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(map(len, (split.train, split.validation, split.heldout))) == len(dataset.items)


def test_training_batches_cover_every_example_once_and_pad_little():
    lengths = [random.Random(n).randint(5, 300) for n in range(400)]
    examples = [{"input_ids": [n] * length, "labels": [n] * length} for n, length in enumerate(lengths)]
    batches = list(_batches(examples, 8, pad_id=-1, rng=random.Random(0)))
    seen = sorted(int(ids[row, 0]) for ids, _, _ in batches for row in range(len(ids)))
    assert seen == list(range(400))
    padding = sum(int((mask == 0).sum()) for _, _, mask in batches)
    unsorted_padding = sum(int((mask == 0).sum()) for _, _, mask in _batches(examples, 8, pad_id=-1, rng=None))
    assert padding < unsorted_padding / 5
    again = [ids[:, 0].tolist() for ids, _, _ in _batches(examples, 8, pad_id=-1, rng=random.Random(0))]
    assert again == [ids[:, 0].tolist() for ids, _, _ in batches]  # seeded: the same order every run


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    config = FinetuneConfig(DATA / "xquad_sample.json", out, max_steps=6, lr=2e-3, batch_size=4, holdout_fraction=0.5,
                            validation_fraction=0.0, with_context=True, max_tokens=320)
    return finetune(config, device="cpu", log=lambda message: None)


def test_lora_training_reduces_loss_and_records_itself(adapter):
    losses = [loss for _, loss in adapter.train_loss]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert 0 < adapter.trainable_share < 0.05  # LoRA trains a small share of the weights
    record = json.loads((adapter.out / "training.json").read_text())
    assert record["base_model"]["sha256"] and record["data"]["sha256"]
    assert set(record["split"]["train_ids"]).isdisjoint(record["split"]["heldout_ids"])
    assert (adapter.out / "adapter_model.safetensors").exists() and (adapter.out / "loss.png").exists()
    heldout = read_dataset(adapter.out / "heldout.jsonl")
    assert {item.id for item in heldout.items} == set(record["split"]["heldout_ids"])


def test_saved_adapter_changes_the_model_output(adapter, generator):
    from rag.generation import TransformersGenerator

    tuned = TransformersGenerator(device="cpu", adapter_dir=adapter.out)
    messages = [{"role": "user", "content": "Context:\n[1] The Broncos scored 24 points.\n\nQuestion: How many points?"}]
    base_scores = generator.option_logprobs(messages, ["24 [1]", "The Broncos"])
    tuned_scores = tuned.option_logprobs(messages, ["24 [1]", "The Broncos"])
    assert base_scores != tuned_scores


def test_adapter_for_another_base_model_is_refused(adapter, tmp_path):
    import shutil

    from rag.generation import AdapterMismatchError, TransformersGenerator

    foreign = tmp_path / "foreign"
    shutil.copytree(adapter.out, foreign)
    record = json.loads((foreign / "training.json").read_text())
    record["base_model"] = {"name": "other-model.gguf", "sha256": "0" * 64}
    (foreign / "training.json").write_text(json.dumps(record))
    with pytest.raises(AdapterMismatchError, match="other-model.gguf"):
        TransformersGenerator(device="cpu", adapter_dir=foreign)


def test_full_finetuning_runs_a_step(tmp_path):
    config = FinetuneConfig(DATA / "xquad_sample.json", tmp_path / "full", method="full", max_steps=1, batch_size=2,
                            validation_fraction=0.0, max_tokens=256, limit=2)
    result = finetune(config, device="cpu", log=lambda message: None)
    assert result.steps == 1 and result.trainable_parameters == result.total_parameters
    assert (tmp_path / "full" / "training.json").exists()
