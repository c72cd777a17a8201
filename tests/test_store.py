"""The segmented store: commits add segments, deletions are tombstones, compaction merges; kill -9 anywhere
leaves an index that opens and holds every committed document exactly once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

import rag.store.segments
from rag.store import DocumentRecord, IndexMismatchError, Store, compact
from rag.types import ALL_COLLECTIONS
from tests import store_writer as w

ROOT = Path(__file__).resolve().parents[1]


def _run(action: str, index: Path, crash_at: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAG_TEST_CRASH_AT", None)
    if crash_at:
        env["RAG_TEST_CRASH_AT"] = crash_at
    result = subprocess.run([sys.executable, "-m", "tests.store_writer", action, str(index)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, -9), result.stderr
    return result.returncode


def assert_holds_exactly(index: Path, docs: set[int]) -> None:
    """Opens, answers, and holds each of `docs` exactly once (rows, vectors, postings), and nothing else."""
    store = Store.open(index, w.MODEL, w.DIMENSION)
    assert {record.doc_id for record in store.documents(collection=ALL_COLLECTIONS).values()} == {w.doc_id(d) for d in docs}
    counts = store.counts(collection=ALL_COLLECTIONS)
    assert counts == {"documents": len(docs), "chunks": len(docs) * w.CHUNKS_PER_DOC,
                      "vectors": len(docs) * w.CHUNKS_PER_DOC}
    assert len(store) == counts["vectors"]
    everything = store.dense(w.vector(0, 0), k=1000, collection=ALL_COLLECTIONS)
    assert len(everything) == counts["chunks"]  # every live vector once, no tombstoned one
    assert {chunk.doc_id for chunk in store.get([id_ for id_, _ in everything], collection=ALL_COLLECTIONS)} == {w.doc_id(d) for d in docs}
    for doc in docs:
        (top_id, score), *_ = store.dense(w.vector(doc, 1), k=3, collection=ALL_COLLECTIONS)
        assert store.get([top_id], collection=ALL_COLLECTIONS)[0].doc_id == w.doc_id(doc) and score == pytest.approx(1.0, abs=1e-5)
        hits = store.lexical(f"zebra{doc}", k=10, collection=ALL_COLLECTIONS)
        assert sorted(chunk.ordinal for chunk in store.get([id_ for id_, _ in hits], collection=ALL_COLLECTIONS)) == [0, 1, 2]
    store.close()


def assert_no_orphans(index: Path) -> None:
    Store.begin(index, w.MODEL, w.DIMENSION, w.CHUNKING).abort()  # the next writer cleans up
    with sqlite3.connect(index / "store.sqlite") as db:
        registered = {row[0] for row in db.execute("SELECT name FROM segments")}
    assert {path.name.removesuffix(".faiss") for path in (index / "segments").iterdir()} == registered


SEEDED = set(w.SEEDED) - w.SEED_DELETED
COMMITTED = (SEEDED | set(w.COMMIT_ADDS)) - w.COMMIT_DELETES


def test_commits_add_segments_and_deletions_are_tombstones(tmp_path):
    index = tmp_path / "index"
    w.seed(index)
    store = Store.open(index)
    manifest = store.manifest
    assert (manifest.segments, manifest.tombstones, manifest.generation) == (2, 3, 3)
    deleted = w.doc_id(next(iter(w.SEED_DELETED)))
    assert not [id_ for id_, _ in store.dense(w.vector(1, 0), 100, collection=ALL_COLLECTIONS) if store.get([id_], collection=ALL_COLLECTIONS)[0].doc_id == deleted]
    assert store.lexical("zebra1", 10, collection=ALL_COLLECTIONS) == []
    assert_holds_exactly(index, SEEDED)

    info = compact(index)
    assert (info.segments_before, info.segments_after, info.tombstones_dropped) == (2, 1, 3)
    assert store.refresh() and store.manifest.tombstones == 0 and store.manifest.segments == 1
    assert_holds_exactly(index, SEEDED)
    assert_no_orphans(index)


def test_buffered_changes_are_invisible_until_commit_and_gone_on_abort(tmp_path):
    index = tmp_path / "index"
    w.seed(index)
    reader = Store.open(index)
    writer = Store.begin(index, w.MODEL, w.DIMENSION, w.CHUNKING)
    writer.add_document(*w.document(50))
    writer.delete([w.doc_id(0)])
    assert reader.counts(collection=ALL_COLLECTIONS)["documents"] == len(SEEDED)
    writer.abort()
    assert_holds_exactly(index, SEEDED)
    with pytest.raises(IndexMismatchError, match="test-model"):
        Store.begin(index, "other-model", w.DIMENSION, {})


@pytest.mark.parametrize("point, survives", [("commit-segment-written", False),
                                             ("commit-before-transaction-end", False),
                                             ("commit-after-transaction-end", True)])
def test_sigkill_during_commit(tmp_path, point, survives):
    index = tmp_path / "index"
    w.seed(index)
    assert _run("commit", index, crash_at=point) == -9
    assert_holds_exactly(index, COMMITTED if survives else SEEDED)
    assert_no_orphans(index)
    if not survives:  # the same work done again lands whole, with no duplicate and no reused id
        assert _run("commit", index) == 0
        assert_holds_exactly(index, COMMITTED)


@pytest.mark.parametrize("point", ["compact-segment-written", "compact-before-transaction-end",
                                   "compact-after-transaction-end"])
def test_sigkill_during_compaction(tmp_path, point):
    index = tmp_path / "index"
    w.seed(index)
    assert _run("compact", index, crash_at=point) == -9
    assert_holds_exactly(index, SEEDED)
    assert_no_orphans(index)
    assert _run("compact", index) == 0
    assert_holds_exactly(index, SEEDED)
    assert Store.open(index).manifest.segments == 1


def test_a_commit_during_compaction_is_kept(tmp_path, monkeypatch):
    """Compaction builds from the segments it started with; a commit landing meanwhile (a delete of a document
    inside those segments, and a new document) survives the swap."""
    index = tmp_path / "index"
    w.seed(index)
    real_crash_point = rag.store.segments.crash_point

    def commit_meanwhile(name: str) -> None:
        if name == "compact-segment-written":
            w.write(index, adds=[40], deletes=[0])  # takes the writer lock: compaction does not hold it
        real_crash_point(name)

    monkeypatch.setattr(rag.store.segments, "crash_point", commit_meanwhile)
    info = compact(index)
    assert info.tombstones_dropped == 3  # the ones known when it started; doc 0's stay, now for the new segment
    expected = (SEEDED - {0}) | {40}
    assert_holds_exactly(index, expected)
    assert Store.open(index).manifest.tombstones == w.CHUNKS_PER_DOC
    compact(index)
    assert_holds_exactly(index, expected)


def test_reader_sees_every_document_while_another_process_compacts(tmp_path):
    index = tmp_path / "index"
    for start in range(0, 60, 6):  # ten segments
        w.write(index, adds=range(start, start + 6))
    w.write(index, deletes=range(0, 60, 7))
    live = set(range(60)) - set(range(0, 60, 7))
    reader = Store.open(index)
    failures, rounds, stop = [], [0], threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            reader.refresh()
            found = {reader.get([id_], collection=ALL_COLLECTIONS)[0].doc_id for id_, _ in reader.dense(w.vector(0, 0), 1000, collection=ALL_COLLECTIONS)}
            if found != {w.doc_id(d) for d in live}:
                failures.append(len(found))
            rounds[0] += 1

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for _ in range(3):
            assert _run("compact", index) == 0
            w.write(index, adds=[100], deletes=[100])  # a commit between compactions, changing nothing visible
    finally:
        stop.set()
        thread.join(30)
    assert rounds[0] > 3 and not failures
    reader.refresh()
    assert reader.manifest.segments == 1
    assert_holds_exactly(index, live)


def _write_snapshot_format(index: Path) -> None:
    """An index as the snapshot store (format 1) wrote it: CURRENT -> snapshots/<name>/{index.faiss, ...}."""
    snapshot = index / "snapshots" / "20260101T000000-abcdef"
    snapshot.mkdir(parents=True)
    db = sqlite3.connect(snapshot / "chunks.sqlite")
    db.executescript("""
        CREATE TABLE documents (doc_id TEXT PRIMARY KEY, source TEXT NOT NULL UNIQUE, content_hash TEXT NOT NULL,
            size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, chunking TEXT NOT NULL, chunk_count INTEGER NOT NULL,
            ingested_at TEXT NOT NULL);
        CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL, ordinal INTEGER NOT NULL,
            text TEXT NOT NULL, source TEXT NOT NULL, page INTEGER, heading TEXT, element_type TEXT,
            tokens INTEGER NOT NULL, hash TEXT NOT NULL);""")
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(w.DIMENSION))
    for doc in SEEDED:
        record, chunks, vectors = w.document(doc)
        db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tuple(record.__getattribute__(f)
                   for f in record.__dataclass_fields__ if f not in ("collection", "warnings", "name")))  # format 1's
        ids = [db.execute("INSERT INTO chunks (doc_id, ordinal, text, source, tokens, hash) VALUES (?, ?, ?, ?, 0, '')",
                          (c.doc_id, c.ordinal, c.text, c.source)).lastrowid for c in chunks]
        flat.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    db.commit()
    db.close()
    faiss.write_index(flat, str(snapshot / "index.faiss"))
    (snapshot / "manifest.json").write_text(json.dumps({"embedding_model": w.MODEL, "dimension": w.DIMENSION,
                                                        "chunking": w.CHUNKING, "format_version": 1}))
    os.symlink(Path("snapshots") / snapshot.name, index / "CURRENT")


def test_snapshot_format_is_refused_for_reading_and_converted_by_a_writer(tmp_path):
    index = tmp_path / "index"
    _write_snapshot_format(index)
    with pytest.raises(IndexMismatchError, match="rag index compact"):
        Store.open(index)
    assert _run("open-for-writing", index, crash_at="migrate-before-rename") == -9
    assert (index / "CURRENT").is_symlink()  # killed mid-conversion: still the old format, still refused
    with pytest.raises(IndexMismatchError):
        Store.open(index)
    assert _run("open-for-writing", index) == 0
    assert not (index / "CURRENT").exists() and not (index / "snapshots").exists()
    assert_holds_exactly(index, SEEDED)
    assert_no_orphans(index)
    w.write(index, adds=[30])  # new ids continue after the converted ones
    assert_holds_exactly(index, SEEDED | {30})


def test_durable_job_log(tmp_path):
    from datetime import timedelta

    from rag.store.jobs import FileOutcome, Job, JobLog

    log = JobLog(tmp_path / "index")
    log.create(Job("a", [FileOutcome("x.md", "/u/x.md")]))
    log.create(Job("b", [], kind="path", spec={"root": "/docs"}, status="running", owner="999999999:1.00"))
    log.close()
    log = JobLog(tmp_path / "index")  # as after a restart
    assert log.get("a").files[0].filename == "x.md" and log.get("nope") is None
    assert [job.id for job in log.unfinished()] == ["a", "b"]  # queued, and running under a dead process
    job = log.get("a")
    assert log.claim(job) and not log.claim(log.get("b") and Job("a", [], owner=None))
    job.status, job.finished_at = "succeeded", "2000-01-01T00:00:00+00:00"
    log.save(job)
    assert log.prune(timedelta(days=7)) == 1 and log.get("a") is None and log.get("b") is not None


def test_cli_documents_and_index_commands(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    index = tmp_path / "index"
    w.seed(index)
    cli = CliRunner()
    listed = json.loads(cli.invoke(app, ["documents", "list", "--index", str(index), "--json"]).stdout)
    assert {d["doc_id"] for d in listed["documents"]} == {w.doc_id(d) for d in SEEDED}
    assert listed["counts"]["documents"] == len(SEEDED) and listed["snapshot"]
    deleted = cli.invoke(app, ["documents", "delete", w.doc_id(0), "--index", str(index), "--json"])
    assert json.loads(deleted.stdout) == {"doc_id": w.doc_id(0), "source": "file0.md", "deleted": True}  # its name
    assert cli.invoke(app, ["documents", "delete", w.doc_id(0), "--index", str(index)]).exit_code == 3
    stats = json.loads(cli.invoke(app, ["index", "stats", "--index", str(index), "--json"]).stdout)
    assert stats["tombstones"] == 2 * w.CHUNKS_PER_DOC and stats["segments"] == 2
    compacted = json.loads(cli.invoke(app, ["index", "compact", "--index", str(index), "--json"]).stdout)
    assert compacted["segments_after"] == 1 and compacted["tombstones_dropped"] == 2 * w.CHUNKS_PER_DOC
    assert_holds_exactly(index, SEEDED - {0})


def test_an_index_from_before_document_warnings_is_upgraded_by_its_first_reader(tmp_path):
    index = tmp_path / "index"
    w.write(index, adds=[0, 1])
    with sqlite3.connect(index / "store.sqlite") as db:  # back to the schema of the previous release
        db.execute("ALTER TABLE documents DROP COLUMN warnings")
    assert_holds_exactly(index, {0, 1})
    store = Store.open(index)
    assert [record.warnings for record in store.documents(collection=ALL_COLLECTIONS).values()] == [(), ()]
    store.close()
    record, chunks, vectors = w.document(2)
    writer = Store.begin(index, w.MODEL, w.DIMENSION, w.CHUNKING)
    writer.add_document(replace(record, warnings=("1 of 3 pages are page-sized images ...: page 2",)), chunks, vectors)
    writer.commit()
    store = Store.open(index)
    assert store.document(w.doc_id(2), collection=ALL_COLLECTIONS).warnings == ("1 of 3 pages are page-sized images ...: page 2",)
    store.close()


def test_an_index_from_before_collections_is_upgraded_in_place_and_then_holds_collections(tmp_path):
    index = tmp_path / "index"
    w.write(index, adds=[0, 1])
    with sqlite3.connect(index / "store.sqlite") as db:  # back to the schema of the previous release
        db.executescript("""
            PRAGMA foreign_keys = OFF;
            CREATE TABLE documents_old (doc_id TEXT PRIMARY KEY, source TEXT NOT NULL UNIQUE, content_hash TEXT NOT
                NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, chunking TEXT NOT NULL, chunk_count INTEGER
                NOT NULL, ingested_at TEXT NOT NULL);
            INSERT INTO documents_old SELECT doc_id, source, content_hash, size, mtime_ns, chunking, chunk_count,
                ingested_at FROM documents;
            DROP TABLE documents;
            ALTER TABLE documents_old RENAME TO documents;
            DROP INDEX chunks_collection;
            ALTER TABLE chunks DROP COLUMN collection;""")
    assert_holds_exactly(index, {0, 1})  # a reader upgrades it; every document is in the default collection
    store = Store.open(index)
    assert store.collections() == {"default": 2} and store.counts(collection="default")["chunks"] == 2 * w.CHUNKS_PER_DOC
    store.close()

    record, chunks, vectors = w.document(0)  # the same file again, in another collection: a second document
    other = Store.begin(index, w.MODEL, w.DIMENSION, w.CHUNKING)
    other.add_document(DocumentRecord("doc-other", record.source, record.content_hash, record.size, record.mtime_ns,
                                      record.chunking, record.chunk_count, record.ingested_at, "other"),
                       [replace(chunk, doc_id="doc-other") for chunk in chunks], vectors)
    other.commit()
    store = Store.open(index)
    assert store.collections() == {"default": 2, "other": 1}
    top = store.dense(w.vector(0, 1), k=10, collection="other")
    assert {chunk.doc_id for chunk in store.get([id_ for id_, _ in top], collection=ALL_COLLECTIONS)} == {"doc-other"}
    assert {chunk.doc_id for chunk in store.get([id_ for id_, _ in top], collection="default")} == set()
    lexical = store.lexical("zebra0", 10, collection="default")
    assert {chunk.doc_id for chunk in store.get([id_ for id_, _ in lexical], collection=ALL_COLLECTIONS)} == {w.doc_id(0)}
    assert store.counts(collection="other") == {"documents": 1, "chunks": w.CHUNKS_PER_DOC, "vectors": w.CHUNKS_PER_DOC}
    assert list(store.documents(collection="other")) == ["doc-other"] and store.document(w.doc_id(0), collection="other") is None
    assert len(store.ids_with_source("file0.md", collection="other")) == w.CHUNKS_PER_DOC
    store.close()
