"""The incremental ingestion job: files → elements → chunks → vectors → a new index snapshot.

Per file the work is a pure function (`parse_file`), run in worker processes; the single writer in this process
embeds the chunks and applies them to a copy of the index, which becomes current only when complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from ingest.chunk import CHUNKER_VERSION, Chunker, ChunkSettings
from ingest.load import LoadError, load, unsupported_type
from ingest.pdf import page_count
from rag.config import Settings
from rag.embed import Embedder
from rag.models import sha256_files
from rag.store import DEFAULT_COLLECTION, DocumentRecord, Store, begin_store, recorded_chunking
from rag.types import Chunk

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")
STATUSES = ("new", "changed", "unchanged", "removed", "skipped", "failed")  # skipped: not a supported file type

# Chunks gathered across files before they are embedded: the embedder orders them by token count, so over this many
# its batches carry under 1% padding (about 5% over 128).
EMBED_WINDOW_CHUNKS = 1024
# Files handed to the parse workers ahead of the embedder, per worker: enough that none waits for work, few enough that
# parsed chunks do not pile up in memory where parsing outruns embedding (a folder of thousands of PDFs, many workers).
PARSE_AHEAD_PER_WORKER = 2
# A longer PDF has its pages read across the parse workers in ranges of this many (about 0.3 s of work each here).
PAGES_PER_TASK = 16


@dataclass(slots=True)
class FileResult:
    source: str
    status: str  # one of STATUSES
    chunks: int = 0
    error: str | None = None
    warnings: tuple[str, ...] = ()  # an ingested file's content that was not indexed, or was read by a guess


@dataclass(slots=True)
class ParsedFile:
    """One file's chunks (or why it could not be read) and what a worker spent on it."""

    chunks: list[Chunk]
    error: str | None = None
    warnings: tuple[str, ...] = ()
    parse_seconds: float = 0.0
    chunk_seconds: float = 0.0


@dataclass(slots=True)
class IngestReport:
    files: list[FileResult] = field(default_factory=list)
    parse_seconds: float = 0.0  # summed over workers
    chunk_seconds: float = 0.0  # summed over workers
    embed_seconds: float = 0.0
    total_seconds: float = 0.0
    chunks_added: int = 0
    snapshot: str | None = None  # None when nothing changed and no snapshot was written
    index_counts: dict[str, int] = field(default_factory=dict)
    stale: int = 0  # documents re-chunked because an older parser/chunker or other chunk settings built them

    @property
    def status_counts(self) -> dict[str, int]:
        counts = Counter(result.status for result in self.files)
        return {status: counts.get(status, 0) for status in STATUSES}

    @property
    def failed(self) -> list[FileResult]:
        return [result for result in self.files if result.status == "failed"]

    @property
    def skipped(self) -> list[FileResult]:
        return [result for result in self.files if result.status == "skipped"]

    @property
    def warned(self) -> list[FileResult]:
        return [result for result in self.files if result.warnings]

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_added / self.total_seconds if self.total_seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "files": {"seen": sum(1 for r in self.files if r.status != "removed"), **self.status_counts,
                      "with_warnings": len(self.warned)},
            "chunks_added": self.chunks_added,
            "stale_rechunked": self.stale,
            "seconds": {"parse": round(self.parse_seconds, 3), "chunk": round(self.chunk_seconds, 3),
                        "embed": round(self.embed_seconds, 3), "total": round(self.total_seconds, 3)},
            "chunks_per_second": round(self.chunks_per_second, 2),
            "snapshot": self.snapshot,
            "index": self.index_counts,
            "results": [asdict(result) for result in self.files],
        }


def discover(root: Path, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[Path]:
    """Files under `root` (or `root` itself), filtered by glob patterns on the path relative to `root`.

    Hidden files and folders are skipped. Without --include every file is taken, so unsupported ones are
    reported rather than silently ignored.
    """
    include, exclude = list(include), list(exclude)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' is neither a file nor a folder")
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue
        if include and not any(_matches(relative, pattern) for pattern in include):
            continue
        if any(_matches(relative, pattern) for pattern in exclude):
            continue
        found.append(path)
    return found


def _matches(relative: str, pattern: str) -> bool:
    return fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(Path(relative).name, pattern)


def doc_id_for(source: str, collection: str = DEFAULT_COLLECTION) -> str:
    """A document's id: its source path's hash (in the default collection, as before collections existed), or
    of the collection and the path, so that one file can be in several collections."""
    key = source if collection == DEFAULT_COLLECTION else f"{collection}\0{source}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def in_order(submit: Callable[[T], Future[R]], items: Iterable[T], ahead: int) -> Iterator[R]:
    """Each item's result, in the items' order; while the caller works on one, at most `ahead` more are submitted."""
    items = iter(items)
    queued = deque(submit(item) for item in itertools.islice(items, ahead))
    while queued:
        result = queued.popleft().result()
        queued.extend(submit(item) for item in itertools.islice(items, 1))  # before yielding: workers go on meanwhile
        yield result


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: ask Linux to kill this worker when the ingest process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died while this worker was still starting up
        os._exit(1)


@lru_cache(maxsize=2)
def _worker_chunker(tokenizer_path: str, chunk_tokens: int, chunk_overlap: int, max_tokens: int) -> Chunker:
    from rag.models import read_tokenizer

    return Chunker(read_tokenizer(tokenizer_path), ChunkSettings(chunk_tokens, chunk_overlap), max_tokens)


def parse_file(path: str, source: str, tokenizer_path: str, chunk_tokens: int, chunk_overlap: int,
               max_tokens: int, collection: str = DEFAULT_COLLECTION, map_pages: Callable = map,
               pages_per_task: int | None = None) -> ParsedFile:
    """Load and chunk one file (a PDF's pages read by `map_pages`, see `parse_pdf`)."""
    started = time.perf_counter()
    try:
        document = load(path, map_pages, pages_per_task)
    except LoadError as error:
        return ParsedFile([], str(error), parse_seconds=time.perf_counter() - started)
    parsed = time.perf_counter()
    chunker = _worker_chunker(tokenizer_path, chunk_tokens, chunk_overlap, max_tokens)
    chunks = chunker.chunk(document, doc_id_for(source, collection), source)
    return ParsedFile(chunks, None, document.warnings, parsed - started, time.perf_counter() - parsed)


def embed_window(batch_size: int) -> int:
    """Chunks gathered (whole files) before one encode call."""
    return max(EMBED_WINDOW_CHUNKS, batch_size)


@dataclass(slots=True)
class _Pending:
    path: Path
    source: str
    status: str  # new or changed
    content_hash: str
    size: int
    mtime_ns: int


class IngestJob:
    """Brings one collection (`settings.collection`) of the configured index in line with the files under a path.

    >>> report = IngestJob(Settings(index_dir="idx")).run(Path("corpus"))  # doctest: +SKIP
    >>> report.status_counts["failed"]  # doctest: +SKIP
    0
    """

    def __init__(self, settings: Settings, embedder: Embedder | None = None):
        self.settings = settings
        self.embedder = embedder or Embedder.from_settings(settings)
        self.chunk_settings = ChunkSettings(settings.chunk_tokens, settings.chunk_overlap)
        self.collection = settings.collection

    @property
    def chunking_key(self) -> str:
        """How this job chunks and embeds, recorded per document: one made otherwise is stale (re-ingested). Read
        after the embedder followed the index's weights (`run`)."""
        return json.dumps({**asdict(self.chunk_settings), "tokenizer": self.embedder.name, "chunker": CHUNKER_VERSION,
                           "embedding_weights": self.embedder.weights}, sort_keys=True)

    def run(self, root: Path, include: Iterable[str] = (), exclude: Iterable[str] = (), prune: bool | None = None,
            on_file: Callable[[FileResult], None] | None = None, on_plan: Callable[[int], None] | None = None
            ) -> IngestReport:
        started = time.perf_counter()
        root = Path(root).resolve()
        files = discover(root, include, exclude)
        prune = root.is_dir() if prune is None else prune
        report = IngestReport()
        notify = on_file or (lambda result: None)

        self.embedder.follow(recorded_chunking(self.settings).get("embedding_weights"))
        store = begin_store(self.settings, self.embedder.name, self.embedder.dimension, json.loads(self.chunking_key))
        try:
            known = {record.source: record for record in store.documents(self.collection).values()}
            pending: list[_Pending] = []
            touched = False
            for path in files:
                record = known.get(str(path))
                result, todo, was_touched = self._classify(path, record, store)
                touched |= was_touched
                if todo:
                    pending.append(todo)
                    report.stale += record is not None and record.chunking != self.chunking_key
                else:
                    report.files.append(result)
                    notify(result)
            if report.stale:
                log.warning("%d documents were built by an older parser, with other chunk settings or embedding "
                            "weights; re-ingesting", report.stale)
            if on_plan:
                on_plan(len(pending))
            for result in self._parse_embed_add(pending, store, report):
                report.files.append(result)
                notify(result)

            if prune:
                present = {str(path) for path in files}
                prefix = str(root) + os.sep
                gone = [record for source, record in known.items() if source.startswith(prefix) and source not in present]
                store.delete(record.doc_id for record in gone)
                for record in gone:
                    result = FileResult(record.source, "removed", record.chunk_count)
                    report.files.append(result)
                    notify(result)

            changed = any(r.status in ("new", "changed", "removed") for r in report.files)
            if changed or touched:
                report.snapshot = store.commit().name
                report.index_counts = store.counts(self.collection)
            else:
                report.index_counts = store.counts(self.collection)
                store.abort()
        except BaseException:
            store.abort()
            raise
        finally:
            store.close()
        report.total_seconds = time.perf_counter() - started
        return report

    def _classify(self, path: Path, record: DocumentRecord | None, store: Store
                  ) -> tuple[FileResult | None, _Pending | None, bool]:
        """Decide whether a file needs parsing. Size + mtime unchanged means unchanged without reading it."""
        source = str(path)
        unsupported = unsupported_type(path)
        if unsupported:  # listed, not parsed (a re-run over such a file loads no model), and not a failure
            return FileResult(source, "skipped", error=unsupported), None, False
        stat = path.stat()
        if record and record.chunking == self.chunking_key:
            if (record.size, record.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                return FileResult(source, "unchanged", record.chunk_count), None, False
            content_hash = sha256_files(path)
            if content_hash == record.content_hash:
                store.touch_document(record.doc_id, stat.st_size, stat.st_mtime_ns)
                return FileResult(source, "unchanged", record.chunk_count), None, True
        else:
            content_hash = sha256_files(path)
        status = "changed" if record else "new"
        return None, _Pending(path, source, status, content_hash, stat.st_size, stat.st_mtime_ns), False

    def _parsed(self, pending: list[_Pending]) -> Iterator[tuple[_Pending, ParsedFile]]:
        """Parse results in input order: with `parse_workers` > 1, files are parsed in worker processes, and the
        pages of a PDF longer than PAGES_PER_TASK are read across them (one long upload is not left to one core)."""
        arguments = [
            (str(item.path), item.source, str(self.embedder.path), self.chunk_settings.chunk_tokens,
             self.chunk_settings.chunk_overlap, self.embedder.max_tokens, self.collection)
            for item in pending
        ]
        workers = self.settings.parse_workers

        def split(item: _Pending) -> bool:
            return item.path.suffix.lower() == ".pdf" and page_count(item.path) > PAGES_PER_TASK

        if workers <= 1 or (len(pending) == 1 and not split(pending[0])):
            for item, args in zip(pending, arguments):
                yield item, parse_file(*args)
            return
        # spawn, not fork: this process may already hold torch's thread pools, which do not survive a fork. The
        # thread that reads long PDFs starts workers too (pool.map), and Linux kills a worker when the thread that
        # started it ends (PR_SET_PDEATHSIG, _die_with_parent): so that thread ends last, after every worker.
        with ThreadPoolExecutor(1, "long-pdf") as long_pdfs, ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
                initargs=(os.getpid(),)) as pool:
            def submit(entry: tuple[_Pending, tuple]) -> Future:
                item, args = entry
                if split(item):  # pages read by the workers; page furniture, elements and chunks found here
                    return long_pdfs.submit(parse_file, *args, map_pages=pool.map, pages_per_task=PAGES_PER_TASK)
                return pool.submit(parse_file, *args)

            yield from zip(pending, in_order(submit, zip(pending, arguments), workers * PARSE_AHEAD_PER_WORKER))

    def _parse_embed_add(self, pending: list[_Pending], store: Store, report: IngestReport) -> Iterator[FileResult]:
        """Embed chunks in batches that span files, so small files do not leave the model underused."""
        batch: list[tuple[_Pending, ParsedFile]] = []
        batch_chunks = 0
        flush_at = embed_window(self.settings.embedding_batch_size)
        for item, parsed in self._parsed(pending):
            report.parse_seconds += parsed.parse_seconds
            report.chunk_seconds += parsed.chunk_seconds
            if parsed.error is not None:
                kept = " (previous version kept in the index)" if item.status == "changed" else ""
                yield FileResult(item.source, "failed", error=parsed.error + kept)
                continue
            for warning in parsed.warnings:
                log.warning("%s: %s", item.source, warning)
            batch.append((item, parsed))
            batch_chunks += len(parsed.chunks)
            if batch_chunks >= flush_at:
                yield from self._embed_and_add(batch, store, report)
                batch, batch_chunks = [], 0
        yield from self._embed_and_add(batch, store, report)

    def _embed_and_add(self, batch: list[tuple[_Pending, ParsedFile]], store: Store,
                       report: IngestReport) -> Iterator[FileResult]:
        if not batch:
            return
        chunks = [chunk for _, parsed in batch for chunk in parsed.chunks]
        started = time.perf_counter()
        vectors = self.embedder.encode_chunks(chunks, {parsed.chunks[0].doc_id: len(parsed.chunks)
                                                       for _, parsed in batch if parsed.chunks})
        report.embed_seconds += time.perf_counter() - started
        offset = 0
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for item, parsed in batch:
            chunks = parsed.chunks
            record = DocumentRecord(doc_id_for(item.source, self.collection), item.source, item.content_hash,
                                    item.size, item.mtime_ns, self.chunking_key, len(chunks), now, self.collection,
                                    parsed.warnings)
            store.add_document(record, chunks, vectors[offset:offset + len(chunks)])
            offset += len(chunks)
            report.chunks_added += len(chunks)
            yield FileResult(item.source, item.status, len(chunks), warnings=parsed.warnings)
