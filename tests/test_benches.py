"""The benchmark scripts still run against today's library: each imports (its module-level set-up included), so a
renamed function or setting fails here instead of on the next person to measure something."""

import importlib
from pathlib import Path

import pytest

BENCHES = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")
                 if path.stem != "__init__")


@pytest.mark.parametrize("name", BENCHES)
def test_bench_imports(name):
    importlib.import_module(f"bench.{name}")
