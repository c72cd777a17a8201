"""`rag eval` and `rag finetune`: measuring the answer paths and training the adapter of the fine-tuned ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import CollectionOption, IndexOption, JsonOption, app, console, errors, settings_from
from rag.config import MAX_CHUNKS
from rag.generation.base import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, MAX_TEMPERATURE
from rag.types import RetrieverKind


@app.command(name="eval")
def evaluate(
    dataset: Annotated[Path, typer.Option(help="SQuAD-format JSON, PubMedQA JSON or JSONL of {question, answers[], gold_sources[]?}.", exists=True)],
    paths: Annotated[str, typer.Option(help="Comma-separated: prompt, rag, finetuned, finetuned-rag.")] = "prompt,rag",
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md, plots and the resume cache.")] = Path("results/eval"),
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score a fixed-seed sample of this many questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, bootstrap and generation.")] = 0,
    ingest_contexts: Annotated[bool, typer.Option("--ingest-contexts", help="Ingest the dataset's passages into the index first (gold passages then known by path).")] = False,
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=MAX_CHUNKS, help="Chunks in the prompt (env: RAG_ANSWER_CHUNKS; default 1).")] = None,
    retriever: Annotated[RetrieverKind, typer.Option(help="Dense (embeddings), bm25 (keywords) or hybrid (both, fused by rank).")] = RetrieverKind.HYBRID,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=MAX_NEW_TOKENS)] = DEFAULT_MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0, max=MAX_TEMPERATURE)] = 0.0,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter for the fine-tuned paths (env: RAG_ADAPTER_DIR).")] = None,
    index: IndexOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare answer paths on a QA dataset: EM/F1/ROUGE-L or accuracy, retrieval recall/MRR/nDCG, groundedness,
    latency and tokens, with bootstrap intervals. Interrupted runs resume from OUT/cache.jsonl."""
    import shlex
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rag.evaluate import EvalConfig, Evaluator
    from rag.pipeline import Pipeline
    from rag.report import write_report

    settings = settings_from(index_dir=index or (out / "index" if ingest_contexts else None), adapter_dir=adapter,
                             collection=collection)
    config = EvalConfig(dataset, [p.strip() for p in paths.split(",") if p.strip()], out, limit, seed,
                        k or settings.prompt_chunks, retriever, max_new_tokens, temperature,
                        collection=settings.collection)
    if ingest_contexts:
        from ingest.job import IngestJob
        from rag.datasets import read_dataset, write_contexts

        folder = write_contexts(read_dataset(dataset), out / "passages")
        report = IngestJob(settings).run(folder)
        errors.print(f"Ingested {report.index_counts.get('documents', 0)} passages into {settings.index_dir}")
    progress = Progress(TextColumn("Evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=errors)
    with progress:
        task = progress.add_task("eval", total=None)
        run = Evaluator(Pipeline(settings), config).run(
            on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    report_path = write_report(run, "rag " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]))
    if as_json:
        print(json.dumps(run.summary, indent=2))
    else:
        console.print(report_path.read_text(), markup=False)


@app.command()
def finetune(
    data: Annotated[Path, typer.Option(help="QA file: SQuAD-format JSON, PubMedQA JSON, or JSONL of {question, answer(s), context?}.", exists=True)],
    out: Annotated[Path, typer.Option(help="Adapter folder to write (weights, training.json, heldout.jsonl, loss.png).")],
    method: Annotated[str, typer.Option(help="lora | full.")] = "lora",
    epochs: Annotated[float, typer.Option(min=0.01)] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-4,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    alpha: Annotated[int, typer.Option(min=1, help="LoRA alpha.")] = 32,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step.")] = 1,
    max_tokens: Annotated[int, typer.Option(min=32, help="Longest example in decoder tokens; longer ones are skipped.")] = 384,
    with_context: Annotated[bool, typer.Option("--with-context", help="Train on gold context + question (for the finetuned-rag path).")] = False,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of groups (articles, abstracts) held out for evaluation.")] = 0.5,
    validation: Annotated[float, typer.Option(min=0.0, max=0.5, help="Share of training groups for validation loss and early stop.")] = 0.1,
    patience: Annotated[int, typer.Option(min=1, help="Validation checks without improvement before stopping.")] = 3,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between validation checks.")] = 10,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many training questions.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    merge: Annotated[bool, typer.Option("--merge", help="Also write OUT/merged: base + adapter as one model folder.")] = False,
    precision: Annotated[str, typer.Option(
        help="auto | fp32 | bf16. auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32.")] = "auto",
    model: Annotated[Optional[str], typer.Option(help="Base decoder folder or .gguf (env: RAG_DECODER_MODEL).")] = None,
) -> None:
    """Fine-tune the decoder on question-answer pairs (LoRA by default), splitting by article/abstract so held-out
    questions never share a passage with training ones. Evaluate with `rag eval --dataset OUT/heldout.jsonl`."""
    from rag.finetune import FinetuneConfig
    from rag.finetune import finetune as run_finetune

    settings = settings_from(decoder_model=model)
    config = FinetuneConfig(data, out, method, epochs, max_steps, lr, rank, alpha, batch_size=batch_size,
                            grad_accum=grad_accum, max_tokens=max_tokens, with_context=with_context,
                            holdout_fraction=holdout, validation_fraction=validation, eval_every=eval_every,
                            patience=patience, seed=seed, limit=limit, precision=precision)
    result = run_finetune(config, settings.decoder_model, settings.device, log=errors.print, merge=merge)
    console.print(f"{result.steps} steps in {result.seconds:.0f} s ({result.steps_per_second:.3f} steps/s); "
                  f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} "
                  f"({result.trainable_share:.2%}); adapter in {out}")
