"""`rag ask` and `rag serve`: answering questions, from the command line or over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import CollectionOption, IndexOption, JsonOption, app, console, errors, settings_from
from rag.config import MAX_CHUNKS, Settings
from rag.generation.base import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, MAX_TEMPERATURE
from rag.types import AnswerPath, RetrieverKind


def _print_answer(answer, title: str | None = None) -> None:
    from rich.panel import Panel

    lines = [answer.text, ""]
    if answer.supported is False:
        lines[1:1] = ["(not found in the sources: shown as the decoder wrote it, without citations)", ""]
    if answer.finish_reason == "length":
        lines[1:1] = ["(cut short: the answer reached its token limit)", ""]
    if answer.see_also:
        lines.append("See also:")
    for citation in answer.citations or answer.see_also:
        where = citation.source + (f", p. {citation.page}" if citation.page else "")
        lines.append(f"[{citation.number}] {where}" + (f" § {citation.heading}" if citation.heading else ""))
    if answer.evidence and answer.answerable:
        lines += ["", "Evidence:"]
        for evidence in answer.evidence:
            where = evidence.source + (f", p. {evidence.page}" if evidence.page is not None else "")
            lines.append(f"[{evidence.number}] {where}: {evidence.readable()}")
    timings = answer.timings
    footer = (f"{answer.usage.get('prompt_tokens', 0)} prompt tokens, {answer.usage.get('completion_tokens', 0)} "
              f"generated, retrieve {timings.get('retrieve_ms', 0):.0f} ms, generate {timings.get('generate_ms', 0):.0f} ms")
    console.print(Panel("\n".join(lines).strip(), title=title or f"path: {answer.path}", subtitle=footer,
                        title_align="left", subtitle_align="right"), markup=False)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    path: Annotated[Optional[AnswerPath], typer.Option("--path", "-p", help="How to answer: without retrieval (prompt), with it (rag), or the same with the fine-tuned adapter (env: RAG_ANSWER_PATH; default: finetuned-rag with the shipped adapter on the packaged decoder, else rag).")] = None,
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=MAX_CHUNKS, help="Chunks in the prompt (env: RAG_ANSWER_CHUNKS; default 1, right for the 135M default model).")] = None,
    retriever: Annotated[RetrieverKind, typer.Option(help="Dense (embeddings), bm25 (keywords) or hybrid (both, fused by rank).")] = RetrieverKind.HYBRID,
    source: Annotated[Optional[str], typer.Option(help="Only retrieve from sources matching this glob.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Answer on the prompt-only and RAG paths (and fine-tuned ones when an adapter is set), side by side.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=MAX_NEW_TOKENS, help="Most tokens to generate.")] = DEFAULT_MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0, max=MAX_TEMPERATURE, help="0 = greedy (deterministic).")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop sequence (repeatable).")] = [],
    shots: Annotated[Optional[Path], typer.Option(help="Few-shot examples (JSON/JSONL of {question, answer}) for the prompt-only path.", exists=True)] = None,
    n_shots: Annotated[int, typer.Option("-n", help="How many few-shot examples to use.")] = 3,
    choices: Annotated[Optional[str], typer.Option(help="Closed-set answers, e.g. 'yes,no,maybe': scored by likelihood.")] = None,
    extract: Annotated[bool, typer.Option("--extract/--no-extract", help="Align the answer to the best-matching span of its sources.")] = True,
    index: IndexOption = None,
    collection: CollectionOption = None,
    backend: Annotated[Optional[str], typer.Option(help="transformers | openai (env: RAG_BACKEND).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Decoder: local HF folder or .gguf (env: RAG_DECODER_MODEL), or the served model name with --backend openai (env: RAG_OPENAI_MODEL).")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL (env: RAG_OPENAI_BASE_URL).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter folder for the fine-tuned paths (env: RAG_ADAPTER_DIR).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Answer a question with citations. Exit code 2 for bad input, 3 when the index, a model, the adapter or
    the decoder server is missing. `--json` prints the API's answer body (POST /v1/ask)."""
    from rag.generation import GenerationParams, available_paths
    from rag.pipeline import AnswerRequest, Pipeline

    is_openai = (backend or Settings().backend) == "openai"
    settings = settings_from(index_dir=index, collection=collection, backend=backend, adapter_dir=adapter,
                             openai_base_url=base_url,
                             **({"openai_model": model} if is_openai else {"decoder_model": model}))
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=list(stop))
    paths = available_paths(settings) if compare else [path or settings.default_path]
    options = tuple(c.strip() for c in choices.split(",") if c.strip()) if choices else None
    requests = [AnswerRequest(question, answer_path, k, retriever, source, params, shots, n_shots, options, extract,
                              collection=settings.collection) for answer_path in paths]
    pipeline = Pipeline(settings)
    pipeline.preload(paths)
    answers = []
    for request in requests:
        if stream and not as_json and not options:
            answer = None
            for piece in pipeline.stream(request):
                if isinstance(piece, str):
                    errors.print(piece, end="", markup=False, highlight=False)
                else:
                    answer = piece
            errors.print()
        else:
            answer = pipeline.answer(request)
        answers.append(answer)
        if not as_json:
            _print_answer(answer)
    if as_json:
        print(json.dumps([answer.to_dict() for answer in answers] if compare else answers[0].to_dict(), indent=2))


@app.command()
def chat(
    path: Annotated[Optional[AnswerPath], typer.Option("--path", "-p", help="Answer path (default as for `rag ask`).")] = None,
    k: Annotated[Optional[int], typer.Option("-k", min=1, max=MAX_CHUNKS, help="Chunks in the prompt (env: RAG_ANSWER_CHUNKS).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=MAX_NEW_TOKENS, help="Most tokens to generate per answer.")] = DEFAULT_MAX_NEW_TOKENS,
    rewrite: Annotated[Optional[str], typer.Option(help="How a follow-up is made standalone for retrieval: rule | decoder | none (env: RAG_FOLLOW_UP_REWRITE).")] = None,
    index: IndexOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """A conversation: one question per line on standard input. A follow-up ("and for async clients?") is made
    standalone before retrieval and answered with the earlier turns in its prompt; each answer keeps its own
    citations. An empty line or the end of input ends it. `--json` prints one answer body per line."""
    import sys

    from rag.conversation import Turn
    from rag.generation import GenerationParams
    from rag.pipeline import AnswerRequest, Pipeline

    settings = settings_from(index_dir=index, collection=collection, follow_up_rewrite=rewrite)
    pipeline = Pipeline(settings)
    history: list[Turn] = []
    interactive = sys.stdin.isatty() and not as_json
    while True:
        if interactive:
            errors.print("[bold]?[/bold] ", end="")
        question = sys.stdin.readline().strip()
        if not question:
            break
        answer = pipeline.answer(AnswerRequest(question, path, k, params=GenerationParams(max_new_tokens=max_new_tokens),
                                               history=tuple(history), collection=settings.collection))
        history.append(Turn(question, answer.text, answer.searched, answer.citations))
        if as_json:
            print(json.dumps(answer.to_dict()), flush=True)
        else:
            _print_answer(answer, title=f"turn {len(history)} · path: {answer.path}"
                          + (f" · searched: {answer.searched}" if answer.searched else ""))


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
    /readyz, /metrics. API keys: admin keys from RAG_API_KEYS or RAG_API_KEYS_FILE, and keys scoped to a collection
    from `rag keys create`; without any key, /v1 is open (a warning is logged)."""
    from api.serve import serve as run_server

    run_server(host=host, port=port, index=index, workers=workers, log_level=log_level, reload=reload)
