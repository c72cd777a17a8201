"""Evaluation reports, read-only: GET /v1/evals lists the folders `rag eval` wrote under RAG_RESULTS_DIR (default
./results); GET /v1/evals/{name}/{file} serves one of their files (report.md as text/markdown, plots as PNG,
results.json).

Path traversal is ruled out by lookup, not by cleaning: a request's name and file are only ever used as keys into
the listing of real entries (folders that hold a report.md; plain files of the served types directly inside
them), and a symlink leading out of its folder is not served.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.files import INLINE_TYPES, untrusted_file
from api.schemas import EvalList, EvalOut

router = APIRouter(tags=["evals"])
REPORT = "report.md"
SERVED_SUFFIXES = {".md", ".png", ".json"}


def _root(request: Request) -> Path:
    return request.app.state.settings.results_dir  # no models or index needed: usable while they load


def _reports(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {entry.name: entry for entry in sorted(root.iterdir())
            if not entry.name.startswith(".") and entry.is_dir() and (entry / REPORT).is_file()}


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
async def list_evals(request: Request) -> EvalList:
    def collect() -> list[EvalOut]:
        return [_summary(name, folder) for name, folder in _reports(_root(request)).items()]

    return EvalList(evals=await run_in_threadpool(collect))


@router.get("/evals/{name}/{filename}", summary="One file of an evaluation report (report.md, plots, results.json)",
            responses={200: {"content": {media: {} for media in INLINE_TYPES.values()}},
                       404: {"description": "No such report or file."}})
async def eval_file(name: str, filename: str, request: Request):
    def find() -> Path | None:
        folder = _reports(_root(request)).get(name)
        return _files(folder).get(filename) if folder is not None else None

    path = await run_in_threadpool(find)
    if path is None:
        raise ApiError(404, "eval_file_not_found", f"No file '{filename[:100]}' in an evaluation '{name[:100]}'.")
    return untrusted_file(path)
