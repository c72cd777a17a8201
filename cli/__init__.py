"""The `rag` command: a thin shell over the library. Parse options, call it, print (tables, or JSON with --json).

    app.py          the Typer app, shared options, library errors → exit codes (once)
    index.py        rag ingest | search | info
    answer.py       rag ask | serve
    experiments.py  rag eval | finetune
    maintenance.py  rag documents list|delete, rag index compact|stats
    keys.py         rag keys create|list|revoke
    worker.py       rag worker
"""

from cli import answer, experiments, index, keys, maintenance, worker  # noqa: F401  (each registers its commands)
from cli.app import EXIT_FILES_FAILED, EXIT_INDEX_ERROR, EXIT_OK, EXIT_USAGE, app

__all__ = ["EXIT_FILES_FAILED", "EXIT_INDEX_ERROR", "EXIT_OK", "EXIT_USAGE", "app"]
