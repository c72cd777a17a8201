"""Converting an index of the snapshot format (a CURRENT symlink + snapshots/, before segments) in place."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import faiss

from rag.store.segments import build_segment_index, index_type, new_segment_name, segment_contents, write_segment
from rag.store.shared import crash_point, utc_now
from rag.store.sqlite_schema import (DB_FILE, FORMAT_VERSION, INSERT_CHUNK, INSERT_DOCUMENT, LOCK_FILE, ensure_schema,
                                     fsync_dir, register_functions, take_lock)

# An index of the snapshot format (CURRENT symlink + snapshots/, before segments) is converted in place, under the
# writer lock. The new database is built under a temporary name with its one segment, fsynced and renamed into
# place; only then are CURRENT and snapshots/ removed. A kill at any point leaves either the old format (converted
# again next time; the half-built files are removed) or the new one (the leftovers are removed).
OLD_POINTER, OLD_SNAPSHOTS = "CURRENT", "snapshots"
OLD_COLUMNS = "id, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash"


def convert_snapshot_format(index_dir: Path) -> bool:
    """Convert an old-format index at `index_dir` under the writer lock (for readers: `Index.open`)."""
    index_dir = Path(index_dir)
    if not (index_dir / OLD_POINTER).is_symlink() or (index_dir / DB_FILE).exists():
        return False
    lock = take_lock(index_dir / LOCK_FILE, "writing to")
    try:
        return migrate_snapshot_format(index_dir)
    finally:
        lock.close()


def migrate_snapshot_format(index_dir: Path) -> bool:
    """Convert an old-format index; True when one was converted."""
    pointer = index_dir / OLD_POINTER
    if (index_dir / DB_FILE).exists():
        _remove_old_format(index_dir)  # a conversion killed after its rename
        return False
    if not pointer.is_symlink():
        return False
    snapshot = (index_dir / os.readlink(pointer)).resolve()
    manifest = json.loads((snapshot / "manifest.json").read_text())
    temp = index_dir / f"{DB_FILE}.migrating"
    temp.unlink(missing_ok=True)
    db = sqlite3.connect(temp, isolation_level=None)
    register_functions(db)
    try:
        ensure_schema(db)
        old = sqlite3.connect(f"file:{snapshot / 'chunks.sqlite'}?mode=ro", uri=True)
        has_context = "context" in {row[1] for row in old.execute("PRAGMA table_info(chunks)")}
        db.execute("BEGIN")
        db.executemany(INSERT_DOCUMENT,
                       old.execute("SELECT doc_id, source, content_hash, size, mtime_ns, chunking, chunk_count, "
                                   "ingested_at, 'default', '[]', '' FROM documents"))
        columns = OLD_COLUMNS + (", context" if has_context else ", ''") + ", 'default', '', NULL"
        db.executemany(INSERT_CHUNK, old.execute(f"SELECT {columns} FROM chunks ORDER BY id"))
        next_id = (db.execute("SELECT MAX(id) FROM chunks").fetchone()[0] or 0) + 1
        old.close()
        vectors, ids = segment_contents(faiss.read_index(str(snapshot / "index.faiss")))
        index = build_segment_index(vectors, ids, int(manifest["dimension"]))
        meta = {"embedding_model": manifest["embedding_model"], "dimension": str(manifest["dimension"]),
                "chunking": json.dumps(manifest["chunking"], sort_keys=True), "format_version": str(FORMAT_VERSION),
                "next_chunk_id": str(next_id), "generation": "1", "committed_at": utc_now()}
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        if index.ntotal:
            name = new_segment_name("m")
            write_segment(index_dir, name, index)
            db.execute("INSERT INTO segments VALUES (?, ?, ?, ?)",
                       (name, index_type(index), int(index.ntotal), utc_now()))
        db.execute("COMMIT")
    finally:
        db.close()
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    crash_point("migrate-before-rename")
    os.replace(temp, index_dir / DB_FILE)
    fsync_dir(index_dir)
    _remove_old_format(index_dir)
    return True


def _remove_old_format(index_dir: Path) -> None:
    (index_dir / f"{DB_FILE}.migrating").unlink(missing_ok=True)
    pointer = index_dir / OLD_POINTER
    if pointer.is_symlink():
        pointer.unlink()
    shutil.rmtree(index_dir / OLD_SNAPSHOTS, ignore_errors=True)
    for leftover in index_dir.glob(f".{OLD_POINTER}.*"):
        leftover.unlink(missing_ok=True)
