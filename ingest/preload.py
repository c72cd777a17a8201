"""Imported once by the parse workers' forkserver (ingest/sandbox.py): the parsers, and the models they load on
first use, are loaded there, so every worker forked from it starts warm (its first file is not charged the
seconds of loading them against its time limit) and shares their memory with its siblings."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def _exit_with_parent() -> Callable[[], None]:
    """While this loads (tens of seconds on a busy machine), end the forkserver if the ingesting process dies: it
    notices its parent's death only once it serves. Returns the function that stops watching, which must run
    before the forkserver forks (a fork copies only the thread that makes it)."""
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if os.getppid() != parent:
                os._exit(0)

    thread = threading.Thread(target=watch, name="preload-parent-watch", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join()

    return stop


_stop_watching = _exit_with_parent()
try:
    from ingest.job import parse_file  # noqa: F401  (the function workers run, with the chunker's imports)
    from ingest.load import warm_up
    from rag.models import transformers_lock

    with transformers_lock():  # the chunker's tokenizer is read by each worker (its path is the job's), with these
        from transformers import AutoTokenizer  # noqa: F401

    warm_up()
finally:
    _stop_watching()
