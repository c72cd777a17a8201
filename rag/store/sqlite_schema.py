"""The embedded store's SQLite database (`<index>/store.sqlite`): its schema and the upgrades of older ones,
connections, write transactions, rows to records, and the directory's lock files and fsync.

The crash-safety argument these serve is at the top of `rag.store.embedded`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path, PurePath

from rag.store.base import DocumentRecord, IndexBusyError, IndexMismatchError
from rag.store.shared import DOCUMENT_COLUMNS
from rag.store.terms import indexed_terms
from rag.types import Chunk, collection_filter

FORMAT_VERSION = 2
DB_FILE = "store.sqlite"
LOCK_FILE = ".lock"
COMPACT_LOCK_FILE = ".compact.lock"
BUSY_TIMEOUT_MS = 30_000
WAL_SIZE_LIMIT = 64 * 2**20

DOCUMENTS_TABLE = """(
    doc_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    chunking TEXT NOT NULL,
    chunk_count INTEGER NOT NULL,
    ingested_at TEXT NOT NULL,
    collection TEXT NOT NULL DEFAULT 'default',
    UNIQUE (collection, source)
)"""
# Columns added after a release, to new databases and to older ones alike, when a writer or reader opens them.
ADDED_COLUMNS = {"documents": {"warnings": "TEXT NOT NULL DEFAULT '[]'",  # JSON list (DocumentRecord.warnings)
                               "name": "TEXT NOT NULL DEFAULT ''"},  # '' in older indexes: shown by file name
                 "chunks": {"name": "TEXT NOT NULL DEFAULT ''",  # its document's name, so a read needs no join
                            "page_end": "INTEGER"}}  # Chunk.page_end: NULL for one page (and in older indexes)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents {DOCUMENTS_TABLE};
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    page INTEGER,
    heading TEXT,
    element_type TEXT,
    tokens INTEGER NOT NULL,
    hash TEXT NOT NULL,
    context TEXT NOT NULL DEFAULT '',
    collection TEXT NOT NULL DEFAULT 'default',  -- its document's, so a collection's chunk ids need no join
    UNIQUE (doc_id, ordinal)
);
-- Contentless: the text is stored once (in chunks); FTS5 keeps only postings of the chunk's analysed terms
-- (rag.store.terms, registered as the SQL function rag_terms), in its own incrementally merged b-tree segments.
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    terms, content='', tokenize="unicode61 remove_diacritics 0 tokenchars '_'");
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts_terms USING fts5vocab(chunks_fts, row);  -- document frequencies
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, terms) VALUES (new.id, rag_terms(new.context, new.text));
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, terms) VALUES ('delete', old.id, rag_terms(old.context, old.text));
    INSERT OR IGNORE INTO tombstones(chunk_id) VALUES (old.id);
END;
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    index_type TEXT NOT NULL,
    vectors INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (chunk_id INTEGER PRIMARY KEY);
"""
INSERT_CHUNK = ("INSERT INTO chunks (id, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash,"
                " context, collection, name, page_end) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_DOCUMENT = (f"INSERT INTO documents ({DOCUMENT_COLUMNS}) "
                   f"VALUES ({', '.join('?' * len(DocumentRecord.__dataclass_fields__))})")


def connect(index_dir: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, full fsync on commit."""
    db = sqlite3.connect(index_dir / DB_FILE, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")  # a bulk commit's WAL shrinks back after checkpoint
    db.execute("PRAGMA foreign_keys = ON")
    register_functions(db)
    if readonly:
        db.execute("PRAGMA query_only = ON")
    return db


def register_functions(db: sqlite3.Connection) -> None:
    """The SQL functions the schema's triggers call (every connection that writes chunk rows needs them)."""
    db.create_function("rag_terms", 2, indexed_terms, deterministic=True)


def ensure_schema(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)
    upgrade(db)
    db.execute("CREATE INDEX IF NOT EXISTS chunks_collection ON chunks(collection)")


def upgrade(db: sqlite3.Connection) -> None:
    """Bring an index built by an earlier version to this schema (a no-op when it is there)."""
    add_collections(db)
    add_columns(db, ADDED_COLUMNS)


def outdated(db: sqlite3.Connection) -> bool:
    """Whether `upgrade` has something to do (checked without the write lock that it takes)."""
    return not _has_column(db, "documents", "collection") or any(
        not _has_column(db, table, column) for table, columns in ADDED_COLUMNS.items() for column in columns)


def add_columns(db: sqlite3.Connection, added: dict[str, dict[str, str]]) -> None:
    """Add the columns (by table: name → definition) a table lacks; SQLite adds a column without rewriting rows."""
    for table, columns in added.items():
        for column, definition in columns.items():
            if not _has_column(db, table, column):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock at once, waiting busy_timeout for another writer) ... COMMIT; rolled back
    on any exception, so a change is applied whole or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    return column in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def add_collections(db: sqlite3.Connection) -> None:
    """Give an index built before collections its `collection` columns (everything joins 'default').

    `documents.source` was UNIQUE on its own, so that table is rebuilt (SQLite cannot alter a constraint): the
    documented procedure, with foreign keys off so that dropping the old table does not cascade to the chunks.
    One transaction: a kill leaves the old schema or the new one."""
    if _has_column(db, "documents", "collection"):
        return
    db.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction, so before BEGIN
    try:
        with write_transaction(db):
            if not _has_column(db, "documents", "collection"):  # another process may have done it meanwhile
                db.execute(f"CREATE TABLE documents_upgraded {DOCUMENTS_TABLE}")
                old = {row[1] for row in db.execute("PRAGMA table_info(documents)")}
                columns = ", ".join(name for name in DocumentRecord.__dataclass_fields__ if name in old)
                db.execute(f"INSERT INTO documents_upgraded ({columns}) SELECT {columns} FROM documents")
                db.execute("DROP TABLE documents")
                db.execute("ALTER TABLE documents_upgraded RENAME TO documents")
                if not _has_column(db, "chunks", "collection"):
                    db.execute("ALTER TABLE chunks ADD COLUMN collection TEXT NOT NULL DEFAULT 'default'")
    finally:
        db.execute("PRAGMA foreign_keys = ON")


def document_from_row(row: tuple) -> DocumentRecord:
    *rest, warnings, name = row  # warnings as JSON text
    return DocumentRecord(*rest, tuple(json.loads(warnings)), name)


def document_row(record: DocumentRecord) -> tuple:
    *rest, warnings, name = astuple(record)
    return (*rest, json.dumps(warnings), name)


def row_to_chunk(row: tuple) -> Chunk:
    id_, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash_, context, name, page_end = row
    return Chunk(doc_id, ordinal, text, source, page, heading, element_type, tokens, hash_, id_, context,
                 name or PurePath(source).name, page_end)

def fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def take_lock(path: Path, what: str) -> object:
    handle = open(path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexBusyError(f"Another process is {what} the index at '{path.parent}'; try again when it ends.")
    return handle

def collection_condition(collection: str, first: bool = False) -> tuple[str, tuple]:
    """The SQL condition (and its argument) that scopes a query to one collection; nothing for every collection."""
    collection = collection_filter(collection)
    if collection is None:
        return "", ()
    return (" WHERE" if first else " AND") + " collection = ?", (collection,)


def check_compatible(meta: dict[str, str], index_dir: Path, embedding_model: str | None,
                     dimension: int | None) -> None:
    version = int(meta.get("format_version", FORMAT_VERSION))
    if version != FORMAT_VERSION:
        raise IndexMismatchError(f"Index at '{index_dir}' has format version {version}; this program reads "
                                 f"version {FORMAT_VERSION}. Re-ingest into a new --index directory.")
    model, dims = meta["embedding_model"], int(meta["dimension"])
    if (embedding_model and embedding_model != model) or (dimension and dimension != dims):
        raise IndexMismatchError(
            f"Index at '{index_dir}' was built with embedding model '{model}' ({dims} dims), but the configured "
            f"model is '{embedding_model}' ({dimension} dims). Its vectors are not comparable: configure the same "
            "model, or ingest into a new --index directory.")

