"""The `rag` command: a thin shell over the library. Parse options, call it, print (tables, or JSON with --json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from rag import offline  # noqa: F401
from rag.config import Settings

app = typer.Typer(
    help="Retrieval-augmented question answering over your documents. Every option can also be set with a "
    "RAG_* environment variable (e.g. RAG_INDEX_DIR).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()
errors = Console(stderr=True)

# Exit codes (documented in the README).
EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_INDEX_ERROR = 0, 1, 2, 3

IndexOption = Annotated[
    Optional[Path], typer.Option("--index", help="Index directory (env: RAG_INDEX_DIR; default ./rag-index).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _settings(**overrides) -> Settings:
    try:
        return Settings().with_overrides(**overrides)
    except ValueError as error:
        errors.print(f"[red]Invalid settings:[/red] {error}")
        raise typer.Exit(EXIT_USAGE) from None


def _fail(message: str, code: int = EXIT_INDEX_ERROR) -> typer.Exit:
    errors.print(f"[red]Error:[/red] {message}")
    return typer.Exit(code)


def _display(source: str) -> str:
    """Sources are stored as absolute paths; show them relative to the working directory when inside it."""
    try:
        return str(Path(source).relative_to(Path.cwd()))
    except ValueError:
        return source


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("unstructured", "pdfminer", "sentence_transformers", "transformers", "httpx", "bm25s"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A file or a folder (searched recursively).", exists=True)],
    index: IndexOption = None,
    include: Annotated[list[str], typer.Option("--include", "-i", help="Glob of files to take, e.g. '*.md' (repeatable).")] = [],
    exclude: Annotated[list[str], typer.Option("--exclude", "-x", help="Glob of files to skip (repeatable).")] = [],
    prune: Annotated[Optional[bool], typer.Option("--prune/--no-prune", help="Remove indexed files that are gone from PATH (default: on for a folder).")] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option(help="Chunk size in embedding tokens (env: RAG_CHUNK_TOKENS; default 200).")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option(help="Overlap between chunks in tokens (env: RAG_CHUNK_OVERLAP; default 32).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Parser processes (env: RAG_PARSE_WORKERS; default 1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Embedding batch size (env: RAG_EMBEDDING_BATCH_SIZE; default 64).")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(help="Sentence-transformers model folder (env: RAG_EMBEDDING_MODEL; default: packaged all-MiniLM-L6-v2).")] = None,
    embedding_precision: Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | onnx | onnx-int8 (env: RAG_EMBEDDING_PRECISION; auto: bf16 on CUDA and on CPUs with native bf16, else onnx-int8).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Parse, chunk and embed documents into the index. Incremental: unchanged files are skipped.

    Exit code 0: all files ingested (files of unsupported types are listed as skipped); 1: some files failed
    (listed, the rest ingested); 2: bad usage;
    3: the index cannot be used (another embedding model, locked by another writer, ...).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest.job import IngestJob
    from rag.models import ModelNotFoundError
    from rag.store import StoreError

    settings = _settings(index_dir=index, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                         parse_workers=workers, embedding_batch_size=batch_size, embedding_model=embedding_model,
                         embedding_precision=embedding_precision)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=errors, disable=as_json, transient=True)
    try:
        with progress:
            task = progress.add_task("Scanning", total=None)
            report = IngestJob(settings).run(
                path, include, exclude, prune,
                on_plan=lambda count: progress.update(task, description="Ingesting", total=count, completed=0),
                on_file=lambda result: result.status in ("new", "changed", "failed") and progress.advance(task),
            )
    except (StoreError, ModelNotFoundError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    except ValueError as error:
        raise _fail(str(error), EXIT_USAGE) from None

    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_ingest_report(report, settings.index_dir)
    raise typer.Exit(EXIT_FILES_FAILED if report.failed else EXIT_OK)


def _print_ingest_report(report, index_dir: Path) -> None:
    if report.stale:
        console.print(f"{report.stale} documents were built by an older parser or with other chunk settings; "
                      "re-ingested them.")
    if report.skipped:
        skipped = Table(title="Files skipped (not a supported type)", title_justify="left")
        skipped.add_column("file", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for result in report.skipped:
            skipped.add_row(_display(result.source), result.error)
        console.print(skipped)
    if report.failed:
        failures = Table(title="Files that failed (everything else was ingested)", title_justify="left")
        failures.add_column("file", overflow="fold")
        failures.add_column("reason", overflow="fold")
        for result in report.failed:
            failures.add_row(_display(result.source), result.error)
        console.print(failures)
    counts = report.status_counts
    summary = Table(title=f"Ingest summary → {index_dir}", title_justify="left", show_header=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    rows = {"files seen": sum(counts.values()) - counts["removed"], **counts,
            "chunks added": report.chunks_added, "chunks in index": report.index_counts.get("chunks", 0),
            "seconds": f"{report.total_seconds:.1f}", "chunks/s": f"{report.chunks_per_second:.1f}"}
    for name, value in rows.items():
        summary.add_row(name, str(value))
    console.print(summary)
    if report.snapshot is None:
        console.print("Nothing changed; the index was left as it was.")


def _open_store(settings: Settings):
    from rag.embed import Embedder
    from rag.store import Store, StoreError

    embedder = Embedder.from_settings(settings)
    try:
        store = Store.open(settings.index_dir, embedder.name)
    except StoreError as error:
        raise _fail(str(error)) from None
    return store, embedder


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="Number of chunks to return.")] = 5,
    index: IndexOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the chunks nearest to a query (dense search), with score, source and page."""
    settings = _settings(index_dir=index)
    store, embedder = _open_store(settings)
    hits = store.search(embedder.encode_query(query), k)
    if as_json:
        print(json.dumps([{"rank": rank, "score": round(score, 4), "id": chunk.id, "source": chunk.source,
                           "page": chunk.page, "heading": chunk.heading, "text": chunk.text}
                          for rank, (chunk, score) in enumerate(hits, 1)], indent=2))
        return
    table = Table(show_lines=True)
    for column in ("#", "score", "source", "text"):
        table.add_column(column, overflow="fold")
    for rank, (chunk, score) in enumerate(hits, 1):
        where = _display(chunk.source) + (f"\np. {chunk.page}" if chunk.page else "")
        if chunk.heading:
            where += f"\n§ {chunk.heading}"
        snippet = chunk.text if len(chunk.text) <= 300 else chunk.text[:300] + "…"
        table.add_row(str(rank), f"{score:.3f}", where, snippet)
    console.print(table)


@app.command()
def info(index: IndexOption = None, as_json: JsonOption = False) -> None:
    """Print the index manifest and its counts (documents, chunks, vectors)."""
    from rag.store import Store, StoreError

    settings = _settings(index_dir=index)
    try:
        store = Store.open(settings.index_dir)
    except StoreError as error:
        raise _fail(str(error)) from None
    data = {**store.manifest.to_dict(), "counts": store.counts(), "path": str(store.directory)}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"Index {settings.index_dir}", title_justify="left", show_header=False)
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def _print_answer(answer, title: str | None = None) -> None:
    from rich.panel import Panel

    lines = [answer.text, ""]
    for citation in answer.citations or []:
        where = _display(citation.source) + (f", p. {citation.page}" if citation.page else "")
        lines.append(f"[{citation.number}] {where}" + (f" § {citation.heading}" if citation.heading else ""))
    timings = answer.timings
    footer = (f"{answer.usage.get('prompt_tokens', 0)} prompt tokens, {answer.usage.get('completion_tokens', 0)} "
              f"generated, retrieve {timings.get('retrieve_ms', 0):.0f} ms, generate {timings.get('generate_ms', 0):.0f} ms")
    console.print(Panel("\n".join(lines).strip(), title=title or f"path: {answer.path}", subtitle=footer,
                        title_align="left", subtitle_align="right"), markup=False)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    path: Annotated[str, typer.Option("--path", "-p", help="prompt | rag | finetuned | finetuned-rag.")] = "rag",
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=50, help="Chunks in the prompt (env: RAG_ANSWER_CHUNKS; default 1, right for the 135M default model).")] = None,
    retriever: Annotated[str, typer.Option(help="dense | bm25 | hybrid.")] = "hybrid",
    source: Annotated[Optional[str], typer.Option(help="Only retrieve from sources matching this glob.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Answer on the prompt-only and RAG paths (and fine-tuned ones when an adapter is set), side by side.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=5.0, help="0 = greedy (deterministic).")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop sequence (repeatable).")] = [],
    shots: Annotated[Optional[Path], typer.Option(help="Few-shot examples (JSON/JSONL of {question, answer}) for the prompt-only path.", exists=True)] = None,
    n_shots: Annotated[int, typer.Option("-n", help="How many few-shot examples to use.")] = 3,
    choices: Annotated[Optional[str], typer.Option(help="Closed-set answers, e.g. 'yes,no,maybe': scored by likelihood.")] = None,
    extract: Annotated[bool, typer.Option("--extract/--no-extract", help="Align the answer to the best-matching span of its sources.")] = True,
    index: IndexOption = None,
    backend: Annotated[Optional[str], typer.Option(help="transformers | openai (env: RAG_BACKEND).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Decoder: local HF folder or .gguf (env: RAG_DECODER_MODEL), or the served model name with --backend openai (env: RAG_OPENAI_MODEL).")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL (env: RAG_OPENAI_BASE_URL).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter folder for the fine-tuned paths (env: RAG_ADAPTER_DIR).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Answer a question with citations. Exit code 3 when the index or a model is missing."""
    from rag.generate import GenerationParams
    from rag.pipeline import AnswerPath, Pipeline

    is_openai = (backend or Settings().backend) == "openai"
    settings = _settings(index_dir=index, backend=backend, adapter_dir=adapter, openai_base_url=base_url,
                         **({"openai_model": model} if is_openai else {"decoder_model": model}))
    try:
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, stop=list(stop))
        paths = [AnswerPath.parse(path)]
        if compare:
            paths = [AnswerPath.PROMPT, AnswerPath.RAG]
            if settings.adapter_dir:
                paths += [AnswerPath.FINETUNED, AnswerPath.FINETUNED_RAG]
    except ValueError as error:
        raise _fail(str(error), EXIT_USAGE) from None
    options = [c.strip() for c in choices.split(",") if c.strip()] if choices else None
    pipeline = Pipeline(settings)
    answers = []
    try:
        for answer_path in paths:
            kwargs = dict(path=answer_path, k=k, retriever=retriever, source=source, params=params,
                          shots_file=shots, shots=n_shots, extract=extract)
            if stream and not as_json and not options:
                answer = None
                for piece in pipeline.stream(question, **kwargs):
                    if isinstance(piece, str):
                        errors.print(piece, end="", markup=False, highlight=False)
                    else:
                        answer = piece
                errors.print()
            else:
                answer = pipeline.answer(question, choices=options, **kwargs)
            answers.append(answer)
            if not as_json:
                _print_answer(answer)
    except ValueError as error:
        raise _fail(str(error), EXIT_USAGE) from None
    except Exception as error:  # missing index/model/adapter or unreachable server: say which, no traceback
        from rag.generate import GeneratorUnavailable, NoAdapterConfigured
        from rag.models import ModelNotFoundError
        from rag.store import StoreError

        if isinstance(error, (StoreError, ModelNotFoundError, NoAdapterConfigured, GeneratorUnavailable)):
            raise _fail(str(error)) from None
        raise
    if as_json:
        print(json.dumps([answer.to_dict() for answer in answers] if compare else answers[0].to_dict(), indent=2))


@app.command(name="eval")
def evaluate(
    dataset: Annotated[Path, typer.Option(help="SQuAD-format JSON, PubMedQA JSON or JSONL of {question, answers[], gold_sources[]?}.", exists=True)],
    paths: Annotated[str, typer.Option(help="Comma-separated: prompt, rag, finetuned, finetuned-rag.")] = "prompt,rag",
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md, plots and the resume cache.")] = Path("results/eval"),
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score a fixed-seed sample of this many questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, bootstrap and generation.")] = 0,
    ingest_contexts: Annotated[bool, typer.Option("--ingest-contexts", help="Ingest the dataset's passages into the index first (gold passages then known by path).")] = False,
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=50, help="Chunks in the prompt (env: RAG_ANSWER_CHUNKS; default 1).")] = None,
    retriever: Annotated[str, typer.Option(help="dense | bm25 | hybrid.")] = "hybrid",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, max=5.0)] = 0.0,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter for the fine-tuned paths (env: RAG_ADAPTER_DIR).")] = None,
    index: IndexOption = None,
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

    settings = _settings(index_dir=index or (out / "index" if ingest_contexts else None), adapter_dir=adapter)
    config = EvalConfig(dataset, [p.strip() for p in paths.split(",") if p.strip()], out, limit, seed,
                        k or settings.answer_chunks, retriever,
                        max_new_tokens, temperature)
    if ingest_contexts:
        from ingest.job import IngestJob
        from rag.datasets import read_dataset, write_contexts

        folder = write_contexts(read_dataset(dataset), out / "passages")
        report = IngestJob(settings).run(folder)
        errors.print(f"Ingested {report.index_counts.get('documents', 0)} passages into {settings.index_dir}")
    progress = Progress(TextColumn("Evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=errors)
    try:
        with progress:
            task = progress.add_task("eval", total=None)
            run = Evaluator(Pipeline(settings), config).run(
                on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    except ValueError as error:
        raise _fail(str(error), EXIT_USAGE) from None
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

    settings = _settings(decoder_model=model)
    try:
        config = FinetuneConfig(data, out, method, epochs, max_steps, lr, rank, alpha, batch_size=batch_size,
                                grad_accum=grad_accum, max_tokens=max_tokens, with_context=with_context,
                                holdout_fraction=holdout, validation_fraction=validation, eval_every=eval_every,
                                patience=patience, seed=seed, limit=limit, precision=precision)
        result = run_finetune(config, settings.decoder_model, settings.device, log=errors.print, merge=merge)
    except ValueError as error:
        raise _fail(str(error), EXIT_USAGE) from None
    console.print(f"{result.steps} steps in {result.seconds:.0f} s ({result.steps_per_second:.3f} steps/s); "
                  f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} "
                  f"({result.trainable_share:.2%}); adapter in {out}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    index: IndexOption = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes; each loads its own models. 1 recommended (job status is per process).")] = 1,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "info",
    reload: Annotated[bool, typer.Option("--reload", help="Restart on code changes (development).")] = False,
) -> None:
    """Serve the HTTP API (FastAPI + uvicorn): /v1/ask, /v1/search, /v1/documents, /v1/chat/completions, /healthz,
    /readyz, /metrics. API keys from RAG_API_KEYS or RAG_API_KEYS_FILE; without keys, /v1 is open (a warning is logged)."""
    from api.serve import serve as run_server

    run_server(host=host, port=port, index=index, workers=workers, log_level=log_level, reload=reload)


if __name__ == "__main__":
    app()
