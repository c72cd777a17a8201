"""The shared state behind the routes: the pipeline, the open `Index`, readiness and the decoder limiter.

The index is opened once; `watch_index` refreshes it when any process (an upload job, `rag ingest`, a compaction)
commits a new generation. A refresh loads only the new segments and swaps the reader's segment set by one
attribute assignment, so a request in flight finishes on the set it started with.
"""

from __future__ import annotations

import logging
import threading
import time

from api.batching import BatchingQueryEmbedder
from api.config import ApiSettings
from api.errors import ApiError
from api.limiter import GenerationLimiter
from rag.config import Settings
from rag.errors import UnavailableError
from rag.generation import available_paths
from rag.pipeline import Pipeline
from rag.index import Index
from rag.types import ALL_COLLECTIONS

logger = logging.getLogger("rag.api")


class Service:
    def __init__(self, settings: Settings, api_settings: ApiSettings, pipeline: Pipeline, metrics):
        self.settings = settings
        self.metrics = metrics
        self.api_settings = api_settings
        self.pipeline = pipeline
        self.limiter = GenerationLimiter(api_settings.max_concurrent_generations, api_settings.max_queue,
                                         api_settings.queue_timeout_s, api_settings.retry_after_s,
                                         on_wait=metrics.queue_wait.observe)
        metrics.generations_running.set_function(lambda: self.limiter.running)
        metrics.generations_waiting.set_function(lambda: self.limiter.waiting)
        self.models_loaded = False
        self.load_error: str | None = None
        self.index_error: str | None = None
        self.index_unavailable = False  # the index could not be opened because its database did not answer
        self.store_error: str | None = None  # the store's database stopped answering (set and cleared by refreshes)
        self._query_embedder: BatchingQueryEmbedder | None = None
        self.index: Index | None = None  # set once by open_index, then refreshed in place
        self._retriever = None  # set by open_index; read by requests without a lock (one reference read)
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load the models and open the index (in a thread, at startup). Failures are kept for /readyz."""
        started = time.perf_counter()
        try:
            self.pipeline.preload(available_paths(self.settings))  # decoders load while the embedder and index do
            embedder = self.pipeline.embedder
            embedder.encode_queries(["load the query encoder now, not on the first request"])
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

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    @property
    def index_open(self) -> bool:
        return self._retriever is not None

    @property
    def not_ready_reason(self) -> str | None:
        """Why requests cannot be answered yet, in words for anyone (no path or error text: those are for the
        operator, in the log and in /readyz for an admin key); None when ready."""
        if self.load_error:
            return "The models could not be loaded; the server log says why."
        if not self.models_loaded:
            return "Loading the models."
        if self.store_error:
            return "The index's database is not answering."
        if self._retriever is None:
            return ("The index's database is not answering." if self.index_unavailable
                    else "No index yet: ingest or upload documents.")
        return None

    # ------------------------------------------------------------------ the open snapshot
    def open_index(self) -> bool:
        """Open the index (once), or bring the open one up to date. False when there is no index yet."""
        from rag.store import IndexNotFoundError

        with self._swap_lock:
            if self.index is not None:
                try:
                    refreshed = self.index.refresh()
                except UnavailableError as error:  # a database that went away: not ready until it is back
                    self.store_error = str(error)
                    raise
                self.store_error = None
                if refreshed:
                    logger.info("index refreshed", extra={"snapshot": self.snapshot,
                                                          **self.index.store.counts(collection=ALL_COLLECTIONS)})
                return True
            try:
                index = Index.open(self.settings, self._query_embedder.name)
            except (IndexNotFoundError, UnavailableError) as error:  # the watcher tries again
                self.index_error, self.index_unavailable = str(error), isinstance(error, UnavailableError)
                return False
            index.refresh()  # load the vectors now, not on the first query
            self.index = index
            warm = self._query_embedder.query_precision
            self._retriever = index.retriever(self._query_embedder)  # queries follow the index's weights
            if self._query_embedder.query_precision != warm:
                self._query_embedder.encode_queries(["load the index's query encoder now"])
            self.pipeline.serve_from(self._retriever)
            self.index_error = None
            logger.info("index opened", extra={"snapshot": self.snapshot, **index.store.counts(collection=ALL_COLLECTIONS)})
            return True

    @property
    def snapshot(self) -> str | None:
        """The name of the generation being served (None while its database does not answer)."""
        if self.index is None:
            return None
        try:
            return self.index.store.manifest.snapshot
        except UnavailableError as error:
            self.store_error = str(error)
            return None

    def index_changed(self) -> None:
        """Called after this process committed: refresh now rather than at the next poll."""
        if self._query_embedder is not None:
            self.open_index()

    def watch_index(self) -> None:
        """Pick up generations committed by another process (`rag ingest`, another worker). Runs in a thread."""
        interval = self.api_settings.index_poll_s
        while interval and not self._stop.wait(interval):
            if not self.models_loaded:
                continue
            try:
                self.open_index()
            except Exception as error:  # keep serving the segments we have
                logger.warning("could not refresh the index", extra={"error": str(error)})

    def stop(self) -> None:
        self._stop.set()
        if self._query_embedder is not None:
            self._query_embedder.close()

    # ------------------------------------------------------------------ for the routes
    @property
    def retriever(self):
        """The open index's retriever; a 503 saying why while there is none (read once per request: a refresh
        swaps in a new one between requests, never during one)."""
        retriever = self._retriever
        if retriever is None:
            self.require_models()
            raise ApiError(503, "index_unavailable", "No index is open yet: upload documents with POST /v1/documents.",
                           headers={"Retry-After": str(self.api_settings.retry_after_s)})
        return retriever

    @property
    def current_index(self) -> Index:
        """The open `Index`, for document and chunk operations; the same 503 as `retriever` while there is none."""
        self.retriever  # noqa: B018
        return self.index

    def require_models(self) -> None:
        if self.load_error:
            raise ApiError(503, "models_unavailable", "The service could not load its models; the server log says why.")
        if not self.models_loaded:
            raise ApiError(503, "loading", "The service is still loading its models; retry shortly.",
                           headers={"Retry-After": str(self.api_settings.retry_after_s)})
