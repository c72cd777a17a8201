"""The shape of the code: no import cycles between the project's modules, one JSON vocabulary for CLI and API.

Imports are read from the source (every `import`, at module level or inside a function: a deferred import is
still a dependency), so these tests load no model and run in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rag", "ingest", "api", "cli")
# What each package may import of the others: `rag` is the library; `ingest` is built on it; `api` and `cli` are the
# shells over both (the `rag` command also starts the server and the worker).
ALLOWED_IMPORTS = {"rag": set(), "ingest": {"rag"}, "api": {"rag", "ingest"}, "cli": {"rag", "ingest", "api"}}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `module` imports: `from a.b import c` counts as a.b.c when c is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imported(module, path, known) for module, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_project_modules():
    graph = import_graph()
    assert {"rag.pipeline", "rag.generation.factory", "api.app", "ingest.job"} <= set(graph)  # the walk sees them
    assert "rag.generation.base" in graph["rag.generation.transformers_backend"]  # and their imports
    assert find_cycles(graph) == []


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded onto the top-level packages (a package's imports of itself left out)."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        package = module.partition(".")[0]
        packages.setdefault(package, set()).update(target.partition(".")[0] for target in targets)
        packages[package].discard(package)
    return packages


def test_package_graph_folds_modules_onto_packages():
    graph = {"rag.a": {"rag.b"}, "rag.b": set(), "api.x": {"rag.a", "api.y"}, "api.y": {"ingest.z"}, "ingest.z": set()}
    assert package_graph(graph) == {"rag": set(), "api": {"rag", "ingest"}, "ingest": set()}
    assert find_cycles(package_graph({"rag.a": {"api.x"}, "api.x": {"rag.b"}, "rag.b": set()})) == [["api", "rag"]]


def test_packages_import_only_in_their_direction():
    """rag imports none of the others; ingest only rag; api rag and ingest; cli any of them; no package cycle."""
    packages = package_graph(import_graph())
    assert set(packages) == set(PACKAGES)
    wrong = {package: sorted(targets - ALLOWED_IMPORTS[package]) for package, targets in packages.items()
             if targets - ALLOWED_IMPORTS[package]}
    assert wrong == {}, f"imports against the package directions: {wrong}"
    assert find_cycles(packages) == []


def test_finetuning_does_not_import_the_answer_pipeline():
    graph = import_graph()
    reachable, todo = set(), ["rag.finetune"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert "rag.pipeline" not in reachable and "rag.evaluate" not in reachable


# ------------------------------------------------------------------------------ one JSON vocabulary, CLI and API
def _answer():
    from rag.pipeline import Answer, Citation

    citation = Citation(1, 7, "docs/a.md", 2, "Timeouts", "HTTPX times out after 5 seconds.")
    return Answer("5 seconds [1]", [citation], "rag", {"prompt_tokens": 90, "completion_tokens": 6},
                  {"retrieve_ms": 4.2, "generate_ms": 310.0}, "After 5 seconds [1].", [citation], "length")


def test_rag_ask_json_and_the_api_answer_have_the_same_fields():
    from api.schemas import AnswerOut, CitationOut

    data = _answer().to_dict()  # what `rag ask --json` prints and what POST /v1/ask returns
    assert set(data) == set(AnswerOut.model_fields)
    assert set(data["citations"][0]) == set(data["sources"][0]) == set(CitationOut.model_fields)
    assert data["answer"] == "5 seconds [1]" and data["finish_reason"] == "length"
    assert AnswerOut.model_validate(data).model_dump() == data


def test_rag_search_json_and_the_api_hits_have_the_same_fields():
    from api.schemas import SearchHit
    from rag.types import Chunk, ScoredChunk

    hit = ScoredChunk(Chunk("d1", 0, "text", "docs/a.md", id=3), 0.031, 1, "hybrid", {"dense": 0.8, "bm25": 4.1})
    data = hit.to_dict()  # each hit of `rag search --json` and of POST /v1/search
    assert set(data) == set(SearchHit.model_fields)
    assert SearchHit.model_validate(data).model_dump() == data


def test_api_names_come_from_the_library_enums():
    from typing import get_args

    from api.schemas import AskRequest, SearchRequest
    from rag.types import AnswerPath, RetrieverKind

    path_name = next(arg for arg in get_args(AskRequest.model_fields["path"].annotation) if arg is not type(None))
    assert set(get_args(path_name)) == {path.value for path in AnswerPath}  # optional: None = the server's default
    for model in (AskRequest, SearchRequest):
        assert set(get_args(model.model_fields["retriever"].annotation)) == {kind.value for kind in RetrieverKind}
