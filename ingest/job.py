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
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from ingest.chunk import CHUNKER_VERSION, Chunker, ChunkSettings
from ingest.limits import LimitError, Limits, check_size
from ingest.load import LoadError, load, unsupported_type
from ingest.pdf_text import page_count
from ingest.sandbox import BudgetError, ParsePool
from rag.config import Settings
from rag.embed import Embedder
from rag.models import sha256_files
from rag.store import DEFAULT_COLLECTION, DocumentRecord, Store, begin_store, recorded_chunking
from rag.types import Chunk

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")
# skipped: not a supported type, or a symbolic link out of the ingested folder
STATUSES = ("new", "changed", "unchanged", "duplicate", "removed", "skipped", "failed")

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
    duplicate_of: str | None = None  # status duplicate: the document (id) that already holds these bytes


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


def discover(root: Path, include: Iterable[str] = (), exclude: Iterable[str] = (),
             follow_links: bool = False) -> list[Path]:
    """Files under `root` (or `root` itself), filtered by glob patterns on the path relative to `root`.

    Hidden files and folders are skipped. Without --include every file is taken, so unsupported ones are
    reported rather than silently ignored. Folders reached by a symbolic link are searched only with
    `follow_links`; without it, links that lead out of `root` are returned as they are, for the job to list as
    skipped (`link_outside`), so nothing outside the folder is read unasked.
    """
    include, exclude = list(include), list(exclude)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' is neither a file nor a folder")
    found = []
    searched = {root.resolve()}  # with follow_links: a link back to a folder searched already is not searched again
    for folder, folders, names in os.walk(root, followlinks=follow_links):
        folder_path = Path(folder)
        folders[:] = [name for name in folders if not name.startswith(".")]
        if follow_links:
            folders[:] = [name for name in folders if (folder_path / name).resolve() not in searched]
            searched.update((folder_path / name).resolve() for name in folders)
        else:  # a linked folder is not searched; one that leads out is listed (and then skipped, with the reason)
            names = names + [name for name in folders if link_outside(folder_path / name, root)]
        for name in names:
            path = folder_path / name
            relative = path.relative_to(root).as_posix()
            if name.startswith(".") or not (path.is_file() or path.is_symlink()):
                continue
            if include and not any(_matches(relative, pattern) for pattern in include):
                continue
            if any(_matches(relative, pattern) for pattern in exclude):
                continue
            found.append(path)
    return sorted(found)


def display_name(path: Path, root: Path) -> str:
    """What users are shown for a file instead of its path on the server: its path below the ingested folder (an
    uploaded file's name, for the uploads area), or its own name when ingested alone or through a link."""
    try:
        return path.relative_to(root).as_posix() if root.is_dir() else path.name
    except ValueError:
        return path.name


def link_outside(path: Path, root: Path) -> str | None:
    """Why `path` is not ingested without --follow-links: it is a symbolic link that leads out of `root`."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    kind = "folder" if target.is_dir() else "file" if target.exists() else "missing file"
    return (f"symbolic link to the {kind} {target}, outside the ingested folder: not followed "
            "(--follow-links follows it)")


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


@lru_cache(maxsize=2)
def _worker_chunker(tokenizer_path: str, chunk_tokens: int, chunk_overlap: int, max_tokens: int) -> Chunker:
    from rag.models import read_tokenizer

    return Chunker(read_tokenizer(tokenizer_path), ChunkSettings(chunk_tokens, chunk_overlap), max_tokens)


def parse_file(path: str, source: str, tokenizer_path: str, chunk_tokens: int, chunk_overlap: int,
               max_tokens: int, collection: str = DEFAULT_COLLECTION, map_pages: Callable = map,
               pages_per_task: int | None = None, limits: Limits | None = None) -> ParsedFile:
    """Load and chunk one file (a PDF's pages read by `map_pages`, see `parse_pdf`), within `limits`."""
    started = time.perf_counter()
    try:
        document = load(path, map_pages, pages_per_task, limits)
    except LoadError as error:
        return ParsedFile([], str(error), parse_seconds=time.perf_counter() - started)
    parsed = time.perf_counter()
    chunker = _worker_chunker(tokenizer_path, chunk_tokens, chunk_overlap, max_tokens)
    chunks = chunker.chunk(document, doc_id_for(source, collection), source)
    warnings = document.warnings
    if not chunks:  # read, but nothing of it became a chunk (e.g. every line was taken for a heading)
        warnings = (*warnings, f"no text indexed: the parser read {len(document.elements)} element(s) and none "
                               "became searchable text, so search will not find this document")
    return ParsedFile(chunks, None, warnings, parsed - started, time.perf_counter() - parsed)


def warm_chunker(tokenizer_path: str, chunk_tokens: int, chunk_overlap: int, max_tokens: int) -> None:
    """A parse worker's start: read the tokenizer before its first file, which is then not charged for it."""
    _worker_chunker(tokenizer_path, chunk_tokens, chunk_overlap, max_tokens)


def parse_budgeted(pool: ParsePool, arguments: tuple, **options: object) -> ParsedFile:
    """`parse_file` in one of `pool`'s workers; a file past its time or memory budget fails with the reason."""
    started = time.perf_counter()
    try:
        return pool.call(parse_file, *arguments, **options)
    except BudgetError as error:
        return ParsedFile([], str(error), parse_seconds=time.perf_counter() - started)


def embed_window(batch_size: int) -> int:
    """Chunks gathered (whole files) before one encode call."""
    return max(EMBED_WINDOW_CHUNKS, batch_size)


@dataclass(slots=True)
class _Pending:
    path: Path
    source: str
    name: str  # what users are shown (DocumentRecord.name)
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
            on_file: Callable[[FileResult], None] | None = None, on_plan: Callable[[int], None] | None = None,
            follow_links: bool = False) -> IngestReport:
        """`follow_links`: also ingest what symbolic links lead to outside `root` (else they are listed as
        skipped)."""
        started = time.perf_counter()
        root = Path(root).resolve()
        files = discover(root, include, exclude, follow_links)
        prune = root.is_dir() if prune is None else prune
        report = IngestReport()
        notify = on_file or (lambda result: None)

        self.embedder.follow(recorded_chunking(self.settings).get("embedding_weights"))
        store = begin_store(self.settings, self.embedder.name, self.embedder.dimension, json.loads(self.chunking_key))
        try:
            known = {record.source: record for record in store.documents(collection=self.collection).values()}
            # What the collection holds after this run, by content: a new file with the same bytes is a duplicate.
            listed, prefix = {str(path) for path in files}, str(root) + os.sep
            contents = {record.content_hash: (record.doc_id, record.name) for source, record in known.items()
                        if not (prune and source.startswith(prefix) and source not in listed)}
            pending: list[_Pending] = []
            touched = False
            outside: set[str] = set()  # links not followed: what they lead to is not this folder's (and not kept)
            for path in files:
                if not follow_links and (reason := link_outside(path, root)):
                    outside.add(str(path))
                    report.files.append(FileResult(str(path), "skipped", error=reason))
                    notify(report.files[-1])
                    continue
                record = known.get(str(path))
                result, todo, was_touched = self._classify(path, record, store, display_name(path, root))
                touched |= was_touched
                if todo and todo.status == "new" and not self.settings.keep_duplicates:
                    result = self._duplicate(todo, contents)
                    todo = None if result else todo
                if todo:
                    contents.setdefault(todo.content_hash, (doc_id_for(todo.source, self.collection), todo.name))
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
                present = listed - outside
                gone = [record for source, record in known.items() if source.startswith(prefix) and source not in present]
                store.delete(record.doc_id for record in gone)
                for record in gone:
                    result = FileResult(record.source, "removed", record.chunk_count)
                    report.files.append(result)
                    notify(result)

            changed = any(r.status in ("new", "changed", "removed") for r in report.files)
            if changed or touched:
                report.snapshot = store.commit().name
                report.index_counts = store.counts(collection=self.collection)
            else:
                report.index_counts = store.counts(collection=self.collection)
                store.abort()
        except BaseException:
            store.abort()
            raise
        finally:
            store.close()
        report.total_seconds = time.perf_counter() - started
        return report

    @staticmethod
    def _duplicate(todo: _Pending, contents: dict[str, tuple[str, str]]) -> FileResult | None:
        """A new file whose bytes a document of the collection (or an earlier file of this run) already holds: the
        one user complaint about ingestion heard most from every peer is the same report indexed twice."""
        if todo.content_hash not in contents:
            return None
        doc_id, name = contents[todo.content_hash]
        return FileResult(todo.source, "duplicate", duplicate_of=doc_id,
                          error=f"the same content as '{name}' ({doc_id}), which is indexed: not indexed again "
                                "(RAG_KEEP_DUPLICATES=true indexes both)")

    def _classify(self, path: Path, record: DocumentRecord | None, store: Store, name: str
                  ) -> tuple[FileResult | None, _Pending | None, bool]:
        """Decide whether a file needs parsing. Size + mtime unchanged means unchanged without reading it."""
        source = str(path)
        unsupported = unsupported_type(path)
        if unsupported:  # listed, not parsed (a re-run over such a file loads no model), and not a failure
            return FileResult(source, "skipped", error=unsupported), None, False
        stat = path.stat()
        try:  # before the file is hashed or read
            check_size(stat.st_size, Limits.from_settings(self.settings))
        except LimitError as error:
            kept = " (previous version kept in the index)" if record else ""
            return FileResult(source, "failed", error=f"{error}{kept}"), None, False
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
        return None, _Pending(path, source, name, status, content_hash, stat.st_size, stat.st_mtime_ns), False

    def _parsed(self, pending: list[_Pending]) -> Iterator[tuple[_Pending, ParsedFile]]:
        """Parse results in input order. Files are parsed in `parse_workers` worker processes, each file within the
        time and memory budget of one (ingest/sandbox.py), so a runaway file fails alone and holds up the files
        behind it no longer than that; with several workers, the pages of a PDF longer than PAGES_PER_TASK are read
        across them (one long upload is not left to one core), each range of them within that budget."""
        limits = Limits.from_settings(self.settings)
        chunker = (str(self.embedder.path), self.chunk_settings.chunk_tokens, self.chunk_settings.chunk_overlap,
                   self.embedder.max_tokens)
        arguments = [(str(item.path), item.source, *chunker, self.collection) for item in pending]
        workers = self.settings.parse_workers

        def split(item: _Pending) -> bool:
            return workers > 1 and item.path.suffix.lower() == ".pdf" and page_count(item.path) > PAGES_PER_TASK

        # The pool closes first (on leaving early too: its busy workers are killed), so no thread waits on a parse.
        with ThreadPoolExecutor(1, "long-pdf") as long_pdfs, ThreadPoolExecutor(workers, "parse") as parses, \
                ParsePool(workers, self.settings.parse_timeout_s, self.settings.parse_memory_mb,
                          warm_up=(warm_chunker, chunker)) as pool:
            def submit(entry: tuple[_Pending, tuple]) -> Future:
                item, args = entry
                if split(item):  # pages read by the workers; page furniture, elements and chunks found here
                    return long_pdfs.submit(parse_file, *args, map_pages=pool.map, pages_per_task=PAGES_PER_TASK,
                                            limits=limits)
                return parses.submit(parse_budgeted, pool, args, limits=limits)

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
                                    parsed.warnings, item.name)
            store.add_document(record, chunks, vectors[offset:offset + len(chunks)])
            offset += len(chunks)
            report.chunks_added += len(chunks)
            yield FileResult(item.source, item.status, len(chunks), warnings=parsed.warnings)
