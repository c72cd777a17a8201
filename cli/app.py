"""The `rag` Typer application, its shared options, and the one place library errors become exit codes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from rag import offline  # noqa: F401
from rag.config import Settings
from rag.errors import RagError, UserError

# Exit codes (documented in the README): 1 is an ingest that ingested everything but some failed files; the
# others come from the error classes in rag/errors.py.
EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_INDEX_ERROR = 0, 1, UserError.exit_code, RagError.exit_code

console = Console()
errors = Console(stderr=True)

IndexOption = Annotated[
    Optional[Path], typer.Option("--index", help="Index directory (env: RAG_INDEX_DIR; default ./rag-index).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
_COLLECTION = Settings.model_fields["collection"]
CollectionOption = Annotated[Optional[str], typer.Option(
    "--collection", help=f"{_COLLECTION.description} (env: RAG_COLLECTION; default {_COLLECTION.default}).")]


class _LibraryErrors(TyperGroup):
    """Runs a command; an error of the library's hierarchy ends it with its message and its exit code (2 for bad
    input, 3 for a missing or unusable index, model, adapter or decoder server), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RagError as error:
            _print_error(error)
            raise typer.Exit(error.exit_code) from None
        except FileNotFoundError as error:  # the operating system's "not found": like NotFoundError
            _print_error(error)
            raise typer.Exit(EXIT_INDEX_ERROR) from None


def _print_error(error: Exception) -> None:
    # Unwrapped (scripts grep it) and not read as markup (messages quote lists in brackets).
    errors.print(Text.assemble(("Error:", "red"), f" {error}"), soft_wrap=True)


app = typer.Typer(
    cls=_LibraryErrors,
    help="Retrieval-augmented question answering over your documents. Every option can also be set with a "
    "RAG_* environment variable (e.g. RAG_INDEX_DIR).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Loggers of libraries that speak at INFO/DEBUG about their own work; quiet unless --verbose.
NOISY_LOGGERS = ("unstructured", "pdfminer", "sentence_transformers", "transformers", "httpx", "bm25s")


def settings_from(**overrides) -> Settings:
    """Settings from RAG_* variables with the CLI flags that were given on top."""
    try:
        return Settings().with_overrides(**overrides)
    except ValueError as error:  # pydantic's ValidationError
        raise UserError(f"Invalid settings: {error}") from None


def display(source: str) -> str:
    """Sources are stored as absolute paths; show them relative to the working directory when inside it."""
    try:
        return str(Path(source).relative_to(Path.cwd()))
    except ValueError:
        return source


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The level on the handler too: bm25s sets its own logger to DEBUG when imported (after this runs), which a
    # logger level set here would not survive.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    if not verbose:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.ERROR)


def print_mapping(data: dict, title: str, as_json: bool) -> None:
    """A flat report (`rag info`, `rag index stats`): JSON, or a two-column table with nested values as JSON."""
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False)
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
