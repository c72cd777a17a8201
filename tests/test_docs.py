"""The README stays short and the docs stay true to the tree (issue #29).

- every Python module of rag/, ingest/, api/ and cli/ is named by its path in docs/architecture.md;
- README.md is at most 300 lines and keeps the two set-up commands that `.ci/run` relies on;
- every relative link in README.md and docs/*.md points at a file that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rag", "ingest", "api", "cli")
README_MAX_LINES = 300
SETUP_COMMANDS = ("scripts/install.sh && scripts/demo.sh", ".venv/bin/python -m pytest")

# [text](target) and ![alt](target); the target ends at whitespace or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _modules() -> list[str]:
    paths = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            paths.append(path.relative_to(ROOT).as_posix())
    return paths


def _named(module: str, text: str) -> bool:
    if module in text:
        return True
    if module.endswith("/__init__.py"):
        folder = module[: -len("__init__.py")]  # "rag/store/"
        return folder in text or f"`{folder.rstrip('/')}`" in text
    return False


def test_every_module_is_named_in_architecture() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = _modules()
    assert modules, "no modules found under rag/, ingest/, api/, cli/"
    missing = [module for module in modules if not _named(module, text)]
    assert not missing, (
        f"{len(missing)} module(s) not named by path in docs/architecture.md "
        "(add a line to its module index):\n  " + "\n  ".join(missing)
    )


def test_readme_is_short_and_keeps_the_setup_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    for command in SETUP_COMMANDS:
        assert command in text, f"README.md lost the set-up command {command!r}"


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _relative_links(text: str) -> list[str]:
    text = FENCE.sub("", text)  # links inside code blocks are examples, not links
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "//")):
            continue  # a URL, mailto:, or an anchor in the same page
        targets.append(target)
    return targets


def test_relative_links_point_at_existing_files() -> None:
    broken = []
    checked = 0
    for document in _documents():
        for target in _relative_links(document.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0].split("?", 1)[0]
            checked += 1
            if not (document.parent / path).exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert checked, "no relative links found: the link pattern is broken"
    assert not broken, "relative links to missing files:\n  " + "\n  ".join(broken)


def test_link_pattern() -> None:
    text = "see [a](docs/a.md#x), ![img](shots/p.png), [web](https://x.org/y) and [here](#top)\n```\n[no](z.md)\n```\n"
    assert _relative_links(text) == ["docs/a.md#x", "shots/p.png"]
