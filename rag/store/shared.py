"""What both index stores share: the lexical query budget, the stored column lists, generation names, timestamps,
the source-glob rule, and the crash points the crash-safety tests kill a process at. Each backend's own schema is in
`rag.store.sqlite_schema` or `rag.store.pg_schema`."""

from __future__ import annotations

import fnmatch
import os
import signal
from datetime import datetime, timezone

from rag.store.base import DocumentRecord

# FTS5 spends ~3 µs ranking each matching row, so a query's cost grows with the postings of its terms. A query
# ranks with its rarest terms (highest IDF) whose postings together stay within this budget, and drops the commoner
# ones (as Elasticsearch's cutoff_frequency does): bounded latency at any index size. Small indexes (XQuAD's 300
# chunks) never reach the budget, so they rank with every term.
LEXICAL_POSTINGS_BUDGET = 5_000  # ~15-25 ms a query on these shared 2 cores (bench/scale.py)
CHUNK_COLUMNS = ("id, doc_id, ordinal, text, source, page, heading, element_type, tokens, hash, context, name, "
                 "page_end")
DOCUMENT_COLUMNS = ", ".join(DocumentRecord.__dataclass_fields__)


def crash_point(name: str) -> None:
    """Tests only: `RAG_TEST_CRASH_AT=<name>` kills the process here, as a power cut or kill -9 would."""
    if os.environ.get("RAG_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def generation_name(generation: int) -> str:
    return f"g{generation:06d}"


def source_matches(source: str, pattern: str) -> bool:
    """A document path matches a glob, or ends with it below some folder."""
    return fnmatch.fnmatch(source, pattern) or fnmatch.fnmatch(source, f"*/{pattern.lstrip('/')}")
