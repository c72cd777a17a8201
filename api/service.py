"""The shared state behind the routes: the pipeline, the open snapshot, readiness and the decoder limiter.

The retriever (one open snapshot + the query embedder) is swapped by a single attribute assignment under a lock
when a new snapshot becomes current. A request that already holds the old retriever finishes on it: the old
snapshot's FAISS index and BM25 arrays are in memory and its SQLite file stays readable while open, even once the
directory is pruned.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from api.batching import BatchingQueryEmbedder
from api.config import ApiSettings
from api.errors import ApiError
from api.limiter import GenerationLimiter
from rag.config import Settings
from rag.generation import available_paths
from rag.pipeline import Pipeline
from rag.store import current_snapshot

logger = logging.getLogger("rag.api")


class Service:
    def __init__(self, settings: Settings, api_settings: ApiSettings, pipeline: Pipeline, metrics):
        self.settings = settings
        self.metrics = metrics
        self.api_settings = api_settings
        self.pipeline = pipeline
        self.limiter = GenerationLimiter(api_settings.max_concurrent_generations, api_settings.max_queue,
                                         api_settings.retry_after_s)
        metrics.generations_running.set_function(lambda: self.limiter.running)
        metrics.generations_waiting.set_function(lambda: self.limiter.waiting)
        self.models_loaded = False
        self.load_error: str | None = None
        self.index_error: str | None = None
        self._query_embedder: BatchingQueryEmbedder | None = None
        self._retriever = None  # set by open_index; read by requests without a lock (one reference read)
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load the models and open the index (in a thread, at startup). Failures are kept for /readyz."""
        started = time.perf_counter()
        try:
            self.pipeline.preload(available_paths(self.settings))  # decoders load while the embedder and index do
            embedder = self._embedder()
            embedder.model  # noqa: B018  (load now, not on the first request)
            self._query_embedder = BatchingQueryEmbedder(embedder)
            self.open_index()
            self.pipeline.generator  # noqa: B018
            if self.settings.adapter:
                self.pipeline.finetuned_generator  # noqa: B018
            self.models_loaded = True
            logger.info("models loaded", extra={"seconds": round(time.perf_counter() - started, 2),
                                                "index_open": self._retriever is not None})
        except Exception as error:  # reported by /readyz; the process stays up for /healthz and diagnosis
            self.load_error = f"{type(error).__name__}: {error}"
            logger.error("loading failed", extra={"error": self.load_error})

    def _embedder(self):
        given = self.pipeline._retriever  # a retriever handed to Pipeline(...) brings its embedder
        if given is not None:
            return given.embedder
        from rag.embed import Embedder

        return Embedder.from_settings(self.settings)

    @property
    def ready(self) -> bool:
        return self.models_loaded and self._retriever is not None

    # ------------------------------------------------------------------ the open snapshot
    def open_index(self) -> bool:
        """Open the current snapshot and make it the one new requests use. False when there is no index yet."""
        from rag.retrieve import Retriever
        from rag.store import IndexNotFoundError, Store

        with self._swap_lock:
            current = current_snapshot(self.settings.index_dir)
            if self._retriever is not None and current == self._retriever.store.directory:
                return True
            try:
                store = Store.open(self.settings.index_dir, self._query_embedder.name)
            except IndexNotFoundError as error:
                self.index_error = str(error)
                return False
            store.lexical  # noqa: B018  (load BM25 now: the snapshot directory may be pruned later)
            self._retriever = Retriever(store, self._query_embedder)
            self.pipeline.retriever = self._retriever  # the pipeline's retriever is a cached attribute
            self.index_error = None
            logger.info("snapshot opened", extra={"snapshot": store.directory.name, **store.counts()})
            return True

    def watch_index(self) -> None:
        """Pick up snapshots committed by another process (`rag ingest`, another worker). Runs in a thread."""
        interval = self.api_settings.index_poll_s
        while interval and not self._stop.wait(interval):
            if not self.models_loaded:
                continue
            try:
                self.open_index()
            except Exception as error:  # a half-visible or broken snapshot: keep serving the one we have
                logger.warning("could not open the new snapshot", extra={"error": str(error)})

    def stop(self) -> None:
        self._stop.set()
        if self._query_embedder is not None:
            self._query_embedder.close()

    # ------------------------------------------------------------------ for the routes
    @property
    def retriever(self):
        retriever = self._retriever
        if retriever is None:
            self.require_models()
            raise ApiError(503, "index_unavailable",
                           f"No index is open yet: upload documents with POST /v1/documents. ({self.index_error})",
                           headers={"Retry-After": str(self.api_settings.retry_after_s)})
        return retriever

    def require_models(self) -> None:
        if self.load_error:
            raise ApiError(503, "models_unavailable", f"The service could not load its models: {self.load_error}")
        if not self.models_loaded:
            raise ApiError(503, "loading", "The service is still loading its models; retry shortly.",
                           headers={"Retry-After": str(self.api_settings.retry_after_s)})

    @property
    def uploads_dir(self) -> Path:
        return self.settings.index_dir / "uploads"
