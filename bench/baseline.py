"""The store and lexical index as they were before segments (commit ca5b5cf), loaded from git for comparison.

Nothing is copied into the tree: the two modules are read with `git show` into a temporary package, so the
benchmarks measure exactly the code that shipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

BASELINE_COMMIT = "ca5b5cf"
ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def _package() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="rag-baseline-")) / "rag_baseline"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for module in ("store", "lexical"):
        source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:rag/{module}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (folder / f"{module}.py").write_text(source.replace("from rag.lexical import", "from rag_baseline.lexical import"))
    return folder


def _load(module: str):
    folder = _package()
    if str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))
    name = f"rag_baseline.{module}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / f"{module}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def snapshot_store():
    """The snapshot `Store` class of ca5b5cf (CURRENT symlink, whole-index copies per commit)."""
    return _load("store").Store


def bm25s_index():
    """The bm25s `LexicalIndex` class of ca5b5cf."""
    return _load("lexical").LexicalIndex
