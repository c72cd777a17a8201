"""`rag ingest`, `rag search`, `rag info`: building the index and looking into it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import (EXIT_FILES_FAILED, EXIT_OK, CollectionOption, IndexOption, JsonOption, app, console,
                         display, errors, print_mapping, settings_from)
from rag.config import (DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS, DEFAULT_EMBEDDING_BATCH_SIZE, DEFAULT_SEARCH_RESULTS,
                        MAX_CHUNKS)
from rag.types import ALL_COLLECTIONS, RetrieverKind


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A file or a folder (searched recursively).", exists=True)],
    index: IndexOption = None,
    collection: CollectionOption = None,
    include: Annotated[list[str], typer.Option("--include", "-i", help="Glob of files to take, e.g. '*.md' (repeatable).")] = [],
    exclude: Annotated[list[str], typer.Option("--exclude", "-x", help="Glob of files to skip (repeatable).")] = [],
    prune: Annotated[Optional[bool], typer.Option("--prune/--no-prune", help="Remove indexed files that are gone from PATH (default: on for a folder).")] = None,
    follow_links: Annotated[bool, typer.Option("--follow-links", help="Follow symbolic links that lead out of PATH (default: list them as skipped).")] = False,
    chunk_tokens: Annotated[Optional[int], typer.Option(help=f"Chunk size in embedding tokens (env: RAG_CHUNK_TOKENS; default {DEFAULT_CHUNK_TOKENS}).")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option(help=f"Overlap between chunks in tokens (env: RAG_CHUNK_OVERLAP; default {DEFAULT_CHUNK_OVERLAP}).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Parser processes (env: RAG_PARSE_WORKERS; default 1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Embedding batch size (env: RAG_EMBEDDING_BATCH_SIZE; default {DEFAULT_EMBEDDING_BATCH_SIZE}).")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(help="Sentence-transformers model folder (env: RAG_EMBEDDING_MODEL; default: packaged all-MiniLM-L6-v2).")] = None,
    embedding_precision: Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | onnx | onnx-int8 (env: RAG_EMBEDDING_PRECISION; auto: bf16 on CUDA and on CPUs with AMX, else onnx-int8).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Parse, chunk and embed documents into the index. Incremental: unchanged files are skipped.

    Exit code 0: all files ingested (files of unsupported types, and links out of PATH, are listed as skipped);
    1: some files failed (listed with the reason, e.g. a limit of RAG_MAX_*; the rest ingested); 2: bad usage;
    3: the index cannot be used (another embedding model, locked by another writer, ...).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest.runner import JobRunner

    settings = settings_from(index_dir=index, collection=collection, chunk_tokens=chunk_tokens,
                             chunk_overlap=chunk_overlap, parse_workers=workers, embedding_batch_size=batch_size,
                             embedding_model=embedding_model, embedding_precision=embedding_precision)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=errors, disable=as_json, transient=True)
    with progress:
        task = progress.add_task("Scanning", total=None)
        # A durable job, like an upload's: a run killed midway is taken over by the next identical command.
        runner = JobRunner(settings)
        report = runner.run(
            runner.start_path(path, include, exclude, prune, follow_links),
            on_plan=lambda count: progress.update(task, description="Ingesting", total=count, completed=0),
            on_file=lambda result: result.status in ("new", "changed", "failed") and progress.advance(task),
        )
    if report.snapshot:
        _compact_if_needed(settings)

    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_ingest_report(report, settings.index_dir)
    raise typer.Exit(EXIT_FILES_FAILED if report.failed else EXIT_OK)


def _compact_if_needed(settings) -> None:
    """Merge small segments once the settings' policy asks for it (an API server does this in the background)."""
    from rag.index import Index
    from rag.store import IndexBusyError

    index = Index.open(settings)
    try:
        index.compact(full=False)
    except IndexBusyError:  # another process is compacting it already
        pass
    finally:
        index.close()


def _print_ingest_report(report, index_dir: Path) -> None:
    if report.stale:
        console.print(f"{report.stale} documents were built by an older parser or with other chunk settings; "
                      "re-ingested them.")
    for title, results, column, cell in (
            ("Files skipped (not a supported type, or a link out of the folder)", report.skipped, "reason",
             lambda result: result.error),
            ("Files that failed (everything else was ingested)", report.failed, "reason", lambda result: result.error),
            ("Duplicates (the same bytes as a document indexed already; not indexed again)",
             [result for result in report.files if result.status == "duplicate"], "same content as",
             lambda result: result.error),
            ("Files ingested with warnings (what the index could not take from them)", report.warned, "warning",
             lambda result: "\n".join(result.warnings))):
        if results:
            table = Table(title=title, title_justify="left")
            table.add_column("file", overflow="fold")
            table.add_column(column, overflow="fold")
            for result in results:
                table.add_row(display(result.source), cell(result))
            console.print(table)
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


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", min=1, max=MAX_CHUNKS, help="Number of chunks to return.")] = DEFAULT_SEARCH_RESULTS,
    retriever: Annotated[RetrieverKind, typer.Option(help="Dense (embeddings), bm25 (keywords) or hybrid (both, fused by rank).")] = RetrieverKind.HYBRID,
    source: Annotated[Optional[str], typer.Option(help="Only search sources matching this glob, e.g. '*.pdf'.")] = None,
    index: IndexOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the chunks most relevant to a query, with score, source and page: the retrieval of `rag ask` and of
    POST /v1/search, without generation."""
    from rag.pipeline import Pipeline

    settings = settings_from(index_dir=index, collection=collection)
    hits = Pipeline(settings).retriever.retrieve(query, k, retriever, source, collection=settings.collection)
    if as_json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=2))
        return
    table = Table(show_lines=True)
    for column in ("#", "score", "source", "text"):
        table.add_column(column, overflow="fold")
    for hit in hits:
        chunk = hit.chunk
        where = chunk.name + (f"\np. {chunk.page}" if chunk.page else "")
        if chunk.heading:
            where += f"\n§ {chunk.heading}"
        snippet = chunk.text if len(chunk.text) <= 300 else chunk.text[:300] + "…"
        table.add_row(str(hit.rank), f"{hit.score:.3f}", where, snippet)
    console.print(table)


@app.command()
def info(index: IndexOption = None, as_json: JsonOption = False) -> None:
    """Print the index manifest, its counts (documents, chunks, vectors) and the limits ingestion holds files to."""
    from ingest.limits import shown
    from rag.store import open_store

    settings = settings_from(index_dir=index)
    store = open_store(settings)
    data = {**store.manifest.to_dict(), "counts": store.counts(collection=ALL_COLLECTIONS),
            "collections": store.collections(),
            "path": str(settings.index_dir) if not settings.store_url else "postgresql",
            "adapter": str(settings.adapter) if settings.adapter else None, "default_path": settings.default_path.value,
            "ingest_limits": shown(settings)}
    print_mapping(data, f"Index {settings.index_dir}", as_json)
