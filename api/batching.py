"""Query embeddings for many concurrent requests, computed in batches by one thread.

Requests embed their query through `encode_query`, which waits while a single worker thread embeds everything
queued so far in one forward pass. Two reasons: the Hugging Face fast tokenizer is not safe to call from several
threads at once ("Already borrowed"), and on a small CPU one batch of 32 short queries costs far less than 32
single-query passes fighting over the same cores.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np


class BatchingQueryEmbedder:
    """Wraps an `Embedder`; everything other than `encode_query` is delegated to it.

    >>> embedder = BatchingQueryEmbedder(Embedder())  # doctest: +SKIP
    >>> embedder.encode_query("timeouts").shape  # doctest: +SKIP
    (384,)
    """

    def __init__(self, embedder, max_batch: int = 64):
        self.embedder = embedder
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[str, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="query-embedder", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str):
        return getattr(self.embedder, name)

    def encode_query(self, query: str) -> np.ndarray:
        future: Future = Future()
        self._queue.put((query, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            try:
                vectors = self.embedder.encode_queries([query for query, _ in batch])
            except BaseException as error:  # every waiter learns of the failure; the worker keeps serving
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), vector in zip(batch, vectors):
                future.set_result(vector)
