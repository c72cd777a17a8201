"""Index stores. `Store` is the embedded one (SQLite + FAISS segments in a directory); see `rag.store.base` for
the interface a server backend implements."""

from rag.store.base import (CommitInfo, CompactionInfo, DocumentRecord, IndexBusyError, IndexMismatchError,
                            IndexNotFoundError, Manifest, StoreError)
from rag.store.embedded import EmbeddedStore, compact

Store = EmbeddedStore

__all__ = ["CommitInfo", "CompactionInfo", "DocumentRecord", "EmbeddedStore", "IndexBusyError", "IndexMismatchError",
           "IndexNotFoundError", "Manifest", "Store", "StoreError", "compact"]
