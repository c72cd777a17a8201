"""Evaluation reports, read-only: GET /v1/evals lists the folders `rag eval` wrote under RAG_RESULTS_DIR (default
./results); GET /v1/evals/{name}/{file} serves one of their files (report.md as text/markdown, plots as PNG,
results.json).

A report belongs to the collection it evaluated (`config.collection` in its results.json; a report without one, from
before collections, to the default collection); a request sees the reports of its own collection only, and another
collection's report is not found, exactly like an unknown name. Reports are files written by `rag eval`, not rows of
the store, so this listing is where their scope is applied.

Path traversal is ruled out by lookup, not by cleaning: a request's name and file are only ever used as keys into
the listing of real entries (folders that hold a report.md; plain files of the served types directly inside
them), and a symlink leading out of its folder is not served.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.auth import ReadScope
from api.errors import ApiError
from api.files import INLINE_TYPES, untrusted_file
from api.schemas import EvalList, EvalOut
from rag.types import DEFAULT_COLLECTION

router = APIRouter(tags=["evals"])
REPORT = "report.md"
RESULTS = "results.json"
SERVED_SUFFIXES = {".md", ".png", ".json"}


def _root(request: Request) -> Path:
    return request.app.state.settings.results_dir  # no models or index needed: usable while they load


def _reports(root: Path, collection: str) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {entry.name: entry for entry in sorted(root.iterdir())
            if not entry.name.startswith(".") and entry.is_dir() and (entry / REPORT).is_file()
            and _collection_of(entry) == collection}


def _collection_of(folder: Path) -> str:
    results = folder / RESULTS
    try:
        return _recorded_collection(results, results.stat().st_mtime_ns)
    except OSError:  # no results.json: a report from before collections
        return DEFAULT_COLLECTION


@lru_cache(maxsize=256)
def _recorded_collection(results: Path, mtime_ns: int) -> str:
    """The collection a results.json records (read once per version of the file: they run to hundreds of KB)."""
    try:
        with results.open(encoding="utf-8") as handle:
            config = json.load(handle).get("config", {})
    except (OSError, ValueError, AttributeError):  # unreadable: nobody's report
        return ""
    return config.get("collection", DEFAULT_COLLECTION) if isinstance(config, dict) else ""


def _files(folder: Path) -> dict[str, Path]:
    real = folder.resolve()
    return {entry.name: entry for entry in sorted(folder.iterdir())
            if entry.suffix.lower() in SERVED_SUFFIXES and not entry.name.startswith(".") and entry.is_file()
            and entry.resolve().parent == real}


def _summary(name: str, folder: Path) -> EvalOut:
    report = folder / REPORT
    with report.open(encoding="utf-8", errors="replace") as handle:
        first = handle.readline().strip()
    modified = datetime.fromtimestamp(report.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return EvalOut(name=name, title=first.lstrip("#").strip() or name, modified_at=modified,
                   files=list(_files(folder)))


@router.get("/evals", response_model=EvalList, summary="Evaluation reports written by `rag eval`")
async def list_evals(request: Request, collection: ReadScope) -> EvalList:
    def collect() -> list[EvalOut]:
        return [_summary(name, folder) for name, folder in _reports(_root(request), collection).items()]

    return EvalList(evals=await run_in_threadpool(collect))


@router.get("/evals/{name}/{filename}", summary="One file of an evaluation report (report.md, plots, results.json)",
            responses={200: {"content": {media: {} for media in INLINE_TYPES.values()}},
                       404: {"description": "No such report or file."}})
async def eval_file(name: str, filename: str, request: Request, collection: ReadScope):
    def find() -> Path | None:
        folder = _reports(_root(request), collection).get(name)
        return _files(folder).get(filename) if folder is not None else None

    path = await run_in_threadpool(find)
    if path is None:
        raise ApiError(404, "eval_file_not_found", f"No file '{filename[:100]}' in an evaluation '{name[:100]}'.")
    return untrusted_file(path)
