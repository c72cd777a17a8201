"""`rag finetune`: instruction fine-tuning of the decoder, LoRA (PEFT) or full, on a question-answer file.

Examples are rendered with the same `PromptBuilder` the answer paths use, so the model is trained on exactly the
prompts it will see: question alone (`finetuned` path), or gold context + question (`--with-context`, for the
`finetuned-rag` path); closed-set datasets (PubMedQA) train the one-word choice prompt. The loss covers the answer
tokens only. Questions are split by group (article, PMID) so no passage is shared between training and the
held-out split, and the split is recorded in the adapter folder for `rag eval` to check against.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag.datasets import QAItem, read_dataset
from rag.errors import UserError
from rag.metrics import question_hash
from rag.models import TRAINING_RECORD, check_precision, sha256_files
from rag.prompt import PromptBuilder, PromptMode
from rag.types import Chunk, ScoredChunk

HELDOUT_FILE = "heldout.jsonl"


@dataclass(slots=True)
class FinetuneConfig:
    data: Path
    out: Path
    method: str = "lora"  # lora | full
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    max_tokens: int = 384
    with_context: bool = False
    holdout_fraction: float = 0.5  # share of groups kept out of training (evaluate on them)
    validation_fraction: float = 0.1  # share of training groups used for validation loss / early stop
    eval_every: int = 10
    patience: int = 3  # validations without improvement before stopping
    seed: int = 0
    limit: int | None = None  # use at most this many training questions
    precision: str = "auto"  # auto | fp32 | bf16 (mixed: fp32 weights, bf16 matmuls)

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise UserError(f"Unknown method '{self.method}'. Supported: ['lora', 'full']")
        check_precision(self.precision)
        if not 0 <= self.holdout_fraction < 1 or not 0 <= self.validation_fraction < 1:
            raise UserError("holdout and validation fractions must be in [0, 1)")


@dataclass(slots=True)
class Split:
    train: list[QAItem]
    validation: list[QAItem]
    heldout: list[QAItem]


def split_by_group(items: list[QAItem], holdout_fraction: float, validation_fraction: float, seed: int) -> Split:
    """Disjoint splits by group, so questions about one passage never sit on both sides."""
    groups = sorted({item.group for item in items})
    random.Random(seed).shuffle(groups)
    n_holdout = round(len(groups) * holdout_fraction)
    heldout_groups = set(groups[:n_holdout])
    training_groups = groups[n_holdout:]
    n_validation = max(1, round(len(training_groups) * validation_fraction)) if validation_fraction else 0
    validation_groups = set(training_groups[:n_validation])
    return Split(
        train=[i for i in items if i.group not in heldout_groups and i.group not in validation_groups],
        validation=[i for i in items if i.group in validation_groups],
        heldout=[i for i in items if i.group in heldout_groups],
    )


def render_example(item: QAItem, builder: PromptBuilder, with_context: bool) -> tuple[list[dict], str]:
    """(prompt messages, target answer) exactly as the matching answer path prompts the model."""
    hits = []
    if with_context and item.context:
        chunk = Chunk(doc_id=item.id, ordinal=0, text=item.context, source=(item.gold_sources or [item.id])[0], id=0)
        hits = [ScoredChunk(chunk, 1.0, 1, "gold")]
    if item.choices:
        prompt = builder.for_choices(item.question, hits, item.choices)
        answer = item.answers[0][:1].upper() + item.answers[0][1:]  # as option scoring reads it: "Yes"
    else:
        prompt = builder.build(item.question, hits, PromptMode.RAG if hits else PromptMode.PROMPT_ONLY)
        answer = item.answers[0] + (" [1]" if hits else "")
    return prompt.messages, answer


def tokenize_example(tokenizer, messages: list[dict], answer: str, max_tokens: int) -> dict | None:
    """input_ids with labels masked (-100) on the prompt; None if the prompt leaves no room for the answer."""
    prompt_ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    answer_ids = tokenizer.encode(answer + tokenizer.eos_token, add_special_tokens=False)
    if len(prompt_ids) + len(answer_ids) > max_tokens:
        return None
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def _ids(encoded) -> list[int]:
    if isinstance(encoded, list):
        return encoded
    return list(encoded["input_ids"])


def with_lora(model, rank: int, alpha: int, dropout: float):
    """The model wrapped with trainable LoRA adapters on the attention projections (the rest frozen)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def _batches(examples: list[dict], batch_size: int, pad_id: int, rng: random.Random | None):
    """Padded (ids, labels, mask) batches. With an rng: shuffled, then sorted by length within windows of 50 batches
    (as transformers' group_by_length), so a batch pads little while the order stays random."""
    import torch

    order = list(range(len(examples)))
    if rng:
        rng.shuffle(order)
        window = 50 * batch_size
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -len(examples[i]["input_ids"]))]
        starts = list(range(0, len(order), batch_size))
        rng.shuffle(starts)
    else:
        starts = range(0, len(order), batch_size)
    for start in starts:
        batch = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        yield ids, labels, mask


@dataclass(slots=True)
class FinetuneResult:
    out: Path
    trainable_parameters: int
    total_parameters: int
    steps: int
    seconds: float
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    validation_loss: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.total_parameters

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def finetune(config: FinetuneConfig, base_model: str | Path | None = None, device: str = "auto",
             log: Callable[[str], None] = print, merge: bool = False) -> FinetuneResult:
    import torch
    from tqdm import tqdm

    from rag.models import autocast, decoder_identity, load_causal_lm, resolve_precision

    torch.manual_seed(config.seed)
    dataset = read_dataset(config.data)
    split = split_by_group(dataset.items, config.holdout_fraction, config.validation_fraction, config.seed)
    train_items = split.train[: config.limit] if config.limit else split.train
    model, tokenizer, device = load_causal_lm(base_model, device, for_training=True)
    identity = decoder_identity(base_model)
    builder = PromptBuilder(tokenizer, config.max_tokens + 4096, 1, margin=0)  # examples are capped below
    encode = lambda items: [e for e in (tokenize_example(tokenizer, *render_example(i, builder, config.with_context),  # noqa: E731
                                                         config.max_tokens) for i in items) if e]
    train, validation = encode(train_items), encode(split.validation)
    if not train:
        raise UserError(f"No training example fits in {config.max_tokens} tokens; raise --max-tokens.")
    log(f"{len(train)} training examples ({len(train_items) - len(train)} too long, skipped), "
        f"{len(validation)} validation, {len(split.heldout)} held out")

    total_parameters = sum(p.numel() for p in model.parameters())
    if config.method == "lora":
        model = with_lora(model, config.rank, config.alpha, config.dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable:,} of {total_parameters:,} ({trainable / total_parameters:.2%})")

    steps_per_epoch = math.ceil(len(train) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or max(1, round(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / total_steps))
    config.precision = resolve_precision(config.precision, device)
    precision_context = autocast(device, config.precision)
    log(f"training on {device} in {config.precision}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(config.seed)

    def validation_loss() -> float:
        model.eval()
        losses = []
        with torch.no_grad(), precision_context:
            for ids, labels, mask in _batches(validation, config.batch_size, pad_id, None):
                losses.append(model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    labels=labels.to(device)).loss.item())
        model.train()
        return sum(losses) / len(losses)

    result = FinetuneResult(config.out, trainable, total_parameters, 0, 0.0)
    best, bad_checks, best_state = math.inf, 0, None
    started = time.perf_counter()
    model.train()
    batches = iter(())
    bar = tqdm(total=total_steps, desc=f"{config.method} fine-tuning", unit="step")
    while result.steps < total_steps:
        optimizer.zero_grad()
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = next(batches, None)
            if batch is None:
                batches = _batches(train, config.batch_size, pad_id, rng)
                batch = next(batches)
            ids, labels, mask = (tensor.to(device) for tensor in batch)
            with precision_context:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / config.grad_accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        result.steps += 1
        result.train_loss.append((result.steps, step_loss))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if validation and (result.steps % config.eval_every == 0 or result.steps == total_steps):
            current = validation_loss()
            result.validation_loss.append((result.steps, current))
            log(f"step {result.steps}: train loss {step_loss:.4f}, validation loss {current:.4f}")
            if current < best - 1e-4:
                best, bad_checks = current, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if _is_trained(k, config)}
            else:
                bad_checks += 1
                if bad_checks >= config.patience:
                    result.stopped_early = True
                    log(f"early stop: no validation improvement in {config.patience} checks")
                    break
    bar.close()
    result.seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)  # keep the weights of the best validation loss

    config.out.mkdir(parents=True, exist_ok=True)
    if config.method == "full":
        _forget_gguf_quantizer(model)
    model.save_pretrained(config.out, safe_serialization=True)
    tokenizer.save_pretrained(config.out)
    if merge and config.method == "lora":
        merged = model.merge_and_unload()
        _forget_gguf_quantizer(merged)
        merged.save_pretrained(config.out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(config.out / "merged")
        log(f"merged model written to {config.out / 'merged'} (serve it with vLLM, or set RAG_DECODER_MODEL)")
    _write_record(config, result, identity, split, train_items)
    _plot_losses(result, config.out / "loss.png")
    return result


def _forget_gguf_quantizer(model) -> None:
    """A GGUF checkpoint is dequantised to full precision when loaded; transformers still carries its quantizer
    bookkeeping, which only serves to refuse `save_pretrained`. The weights themselves are plain tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _is_trained(name: str, config: FinetuneConfig) -> bool:
    return config.method == "full" or "lora_" in name


def _write_record(config: FinetuneConfig, result: FinetuneResult, identity: dict, split: Split,
                  train_items: list[QAItem]) -> None:
    hyper = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    record = {
        "method": config.method,
        "base_model": identity,
        "data": {"path": str(config.data), "sha256": sha256_files(config.data)},
        "hyperparameters": hyper,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "stopped_early": result.stopped_early,
        "train_loss": result.train_loss,
        "validation_loss": result.validation_loss,
        "split": {
            "train_ids": [i.id for i in train_items],
            "validation_ids": [i.id for i in split.validation],
            "heldout_ids": [i.id for i in split.heldout],
        },
        "train_question_hashes": [question_hash(i.question) for i in train_items],
        "validation_question_hashes": [question_hash(i.question) for i in split.validation],
    }
    (config.out / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    with open(config.out / HELDOUT_FILE, "w") as handle:
        for item in split.heldout:
            handle.write(json.dumps({"id": item.id, "question": item.question, "answers": item.answers,
                                     "gold_sources": item.gold_sources, "choices": item.choices,
                                     "group": item.group}) + "\n")


def _plot_losses(result: FinetuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if result.train_loss:
        ax.plot(*zip(*result.train_loss), label="train", alpha=0.7)
    if result.validation_loss:
        ax.plot(*zip(*result.validation_loss), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
