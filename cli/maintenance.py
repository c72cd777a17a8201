"""`rag documents list|delete` and `rag index compact|stats`: the API's document and index operations, through the
same `rag.index.Index` and with the same JSON field names."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from cli.app import (CollectionOption, IndexOption, JsonOption, app, console, print_mapping,
                         settings_from)

documents_app = typer.Typer(help="List and delete the documents in the index.", no_args_is_help=True)
index_app = typer.Typer(help="Maintain the index: compaction and statistics.", no_args_is_help=True)
app.add_typer(documents_app, name="documents")
app.add_typer(index_app, name="index")


def _open_index(index_dir, collection: str | None = None):
    from rag.index import Index

    return Index.open(settings_from(index_dir=index_dir, collection=collection))


@documents_app.command("list")
def documents_list(index: IndexOption = None, collection: CollectionOption = None,
                   as_json: JsonOption = False) -> None:
    """The documents of a collection, with their ids (for `rag documents delete`). Same fields as GET /v1/documents."""
    from rag.index import listed

    opened = _open_index(index, collection)
    collection = opened.settings.collection
    records = opened.documents(collection)
    data = {"collection": collection,
            "documents": [listed(record) for record in records],
            "counts": opened.store.counts(collection=collection), "snapshot": opened.store.manifest.snapshot}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"{len(records)} documents in {collection}", title_justify="left")
    warned = any(record.warnings for record in records)
    for column in ("doc_id", "source", "chunks", "ingested at", *(["warnings"] if warned else [])):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(record.doc_id, record.name, str(record.chunk_count), record.ingested_at,
                      *(["\n".join(record.warnings)] if warned else []))
    console.print(table)


@documents_app.command("delete")
def documents_delete(doc_id: Annotated[str, typer.Argument(help="The document's id (see `rag documents list`).")],
                     index: IndexOption = None, collection: CollectionOption = None,
                     as_json: JsonOption = False) -> None:
    """Remove a document of a collection from the index. Same fields as DELETE /v1/documents/{doc_id}. Exit 3 when
    the collection has none."""
    opened = _open_index(index, collection)
    record = opened.delete(doc_id, opened.settings.collection)
    if as_json:
        print(json.dumps({"doc_id": record.doc_id, "source": record.name, "deleted": True}, indent=2))
    else:
        console.print(f"Deleted {record.name} ({record.doc_id}).")


@index_app.command("compact")
def index_compact(
    index: IndexOption = None,
    if_needed: Annotated[bool, typer.Option("--if-needed", help="Only when the policy asks (RAG_COMPACT_MAX_SEGMENTS, RAG_COMPACT_TOMBSTONE_RATIO); default: merge everything.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Merge the vector segments into one and drop deleted vectors (an IVF index for a large one). Readers and writers
    keep working meanwhile. Also converts an index of the older snapshot format."""
    info = _open_index(index).compact(full=not if_needed)
    data = asdict(info) if info else {"compacted": False}
    if as_json:
        print(json.dumps(data, indent=2))
    elif info is None:
        console.print("Nothing to compact.")
    else:
        console.print(f"{info.segments_before} segments → {info.segments_after}; {info.vectors} vectors "
                      f"({info.index_type}), {info.tombstones_dropped} deleted vectors dropped, {info.seconds:.1f} s.")


@index_app.command("stats")
def index_stats(index: IndexOption = None, as_json: JsonOption = False) -> None:
    """Counts, segments, deleted vectors awaiting compaction and bytes on disk."""
    data = _open_index(index).stats()
    print_mapping(data, f"Index {data['path']}", as_json)
