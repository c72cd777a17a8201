"""`Index`: the one object the CLI and the API use to open, refresh, list, delete, compact and report on an index.

    >>> index = Index.open(Settings(index_dir="rag-index"))  # doctest: +SKIP
    >>> index.stats()["counts"]  # doctest: +SKIP
    {'documents': 44, 'chunks': 749, 'vectors': 749}

Reads go through one open `Store` that `refresh()` brings up to date with what other processes committed (it
loads only the new segments). Deletion and compaction take the writer and compaction locks themselves.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rag.config import Settings
from rag.errors import NotFoundError
from rag.store import CompactionInfo, DocumentRecord, Store, compact
from rag.store.embedded import DB_FILE, SEGMENTS


class DocumentNotFoundError(NotFoundError):
    """No document with this id in the index."""

    code = "document_not_found"


class Index:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store

    @classmethod
    def open(cls, settings: Settings, embedding_model: str | None = None, dimension: int | None = None) -> "Index":
        """Open the index at `settings.index_dir` (converting an old snapshot-format index in place first)."""
        from rag.store.embedded import LOCK_FILE, _lock, migrate_snapshot_format

        index_dir = Path(settings.index_dir)
        if (index_dir / "CURRENT").is_symlink() and not (index_dir / DB_FILE).exists():
            lock = _lock(index_dir / LOCK_FILE, "writing to")
            try:
                migrate_snapshot_format(index_dir)
            finally:
                lock.close()
        return cls(settings, Store.open(index_dir, embedding_model, dimension))

    @property
    def index_dir(self) -> Path:
        return Path(self.settings.index_dir)

    def refresh(self) -> bool:
        """Pick up commits and compactions made since (by this or another process); True when there were any."""
        return self.store.refresh()

    def documents(self) -> list[DocumentRecord]:
        return sorted(self.store.documents().values(), key=lambda record: record.source)

    def document(self, doc_id: str) -> DocumentRecord:
        record = self.store.document(doc_id)
        if record is None:
            raise DocumentNotFoundError(f"No document '{doc_id[:64]}' in the index.")
        return record

    def delete(self, doc_id: str) -> DocumentRecord:
        """Remove one document (its rows at once, its vectors as tombstones until compaction)."""
        record = self.document(doc_id)
        manifest = self.store.manifest
        writer = Store.begin(self.index_dir, manifest.embedding_model, manifest.dimension, manifest.chunking)
        try:
            writer.delete([doc_id])
            writer.commit()
        finally:
            writer.close()
        self.refresh()
        return record

    def compact(self, full: bool = True) -> CompactionInfo | None:
        """Merge segments and drop deleted vectors; without `full`, only when the settings' policy asks for it."""
        info = compact(self.index_dir, full=full, max_segments=self.settings.compact_max_segments,
                       tombstone_ratio=self.settings.compact_tombstone_ratio)
        self.refresh()
        return info

    def stats(self) -> dict:
        """The manifest, counts, segments and bytes on disk; the same fields for `rag index stats --json` and the API."""
        manifest = self.store.manifest
        segments = [{"name": name, "index_type": kind, "vectors": vectors, "created_at": created}
                    for name, kind, vectors, created in self.store.db.execute(
                        "SELECT name, index_type, vectors, created_at FROM segments ORDER BY name")]
        disk = {"database": sum(path.stat().st_size for path in self.index_dir.glob(f"{DB_FILE}*")),
                "segments": sum(path.stat().st_size for path in (self.index_dir / SEGMENTS).glob("*.faiss"))}
        return {**asdict(manifest), "counts": self.store.counts(), "segment_list": segments,
                "bytes_on_disk": {**disk, "total": sum(disk.values())}, "path": str(self.index_dir)}

    def close(self) -> None:
        self.store.close()
