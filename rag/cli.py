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
        for noisy in ("unstructured", "pdfminer", "sentence_transformers", "transformers", "httpx"):
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
    workers: Annotated[Optional[int], typer.Option(help="Parser processes (env: RAG_PARSE_WORKERS; default 2).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Embedding batch size (env: RAG_EMBEDDING_BATCH_SIZE; default 64).")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(help="Sentence-transformers model folder (env: RAG_EMBEDDING_MODEL; default: packaged all-MiniLM-L6-v2).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Parse, chunk and embed documents into the index. Incremental: unchanged files are skipped.

    Exit code 0: all files ingested; 1: some files failed (listed, the rest ingested); 2: bad usage;
    3: the index cannot be used (another embedding model, locked by another writer, ...).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest.job import IngestJob
    from rag.models import ModelNotFoundError
    from rag.store import StoreError

    settings = _settings(index_dir=index, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                         parse_workers=workers, embedding_batch_size=batch_size, embedding_model=embedding_model)
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

    embedder = Embedder(settings.embedding_model, settings.device, settings.embedding_batch_size)
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


if __name__ == "__main__":
    app()
