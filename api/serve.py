"""`rag serve`: run the HTTP API under uvicorn."""

from __future__ import annotations

import os
from pathlib import Path


def serve(host: str = "127.0.0.1", port: int = 8000, index: Path | None = None, workers: int = 1,
          log_level: str = "info", reload: bool = False) -> None:
    """Serve the API until interrupted.

    One worker is the right default: the decoder already uses every core. Extra workers each load their own models
    and pick up each other's commits within RAG_INDEX_POLL_S seconds; jobs are in the index's job log, so any
    worker answers for any job, and the writer lock makes them take turns at ingesting.
    """
    import uvicorn

    from api.observability import configure_logging

    if index is not None:
        os.environ["RAG_INDEX_DIR"] = str(index)  # workers are separate processes: they read the environment
    configure_logging(log_level.upper())
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers, reload=reload,
                log_level=log_level, log_config=None, access_log=False, timeout_graceful_shutdown=30,
                proxy_headers=True)
