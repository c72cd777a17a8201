"""The HTTP API through FastAPI's TestClient: every route and every error code.

A real index (three httpx docs, the packaged embedder) and the real packaged decoder (session fixture
`generator`), with max_new_tokens ≤ 8 so each generation takes a moment. One file (over 400 lines) because its
tests share the module-scoped app and index fixtures: one app start for all the read-only routes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS
from tests.pdfs import report_with_scanned_pages

KEY, OTHER_KEY, REVOKED = "test-key-1", "test-key-2", "revoked-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HTTPX_FILES = ("quickstart.md", "advanced/timeouts.md", "exceptions.md")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def api_base_index(tmp_path_factory, embedder) -> Path:
    """A small real index built once; tests that change an index work on a copy (`api_index`)."""
    from ingest.job import IngestJob
    from rag.config import Settings

    root = tmp_path_factory.mktemp("api-index")
    docs = root / "docs"
    docs.mkdir()
    for name in HTTPX_FILES:
        shutil.copy(CORPUS / "httpx" / name, docs / Path(name).name)
    IngestJob(Settings(index_dir=root / "index", parse_workers=1), embedder).run(docs)
    return root / "index"


@pytest.fixture
def api_index(api_base_index, tmp_path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(api_base_index, target, symlinks=True)
    return target


SHARED = object()


def build_app(index_dir: Path, embedder, generator, ingest_embedder=SHARED, **api_options):
    """The app over `index_dir`, sharing the session's loaded models (uploads too, unless told otherwise)."""
    from api.app import create_app
    from api.config import ApiSettings
    from rag.config import Settings
    from rag.pipeline import Pipeline
    from rag.retrieve import Retriever
    from rag.store import Store

    settings = Settings(index_dir=index_dir, parse_workers=1)
    pipeline = Pipeline(settings, retriever=Retriever(Store.open(index_dir), embedder), generator=generator)
    api_settings = ApiSettings(**{"api_keys": f"{KEY},{OTHER_KEY}", "revoked_api_keys": REVOKED, "index_poll_s": 0,
                                  **api_options})
    return create_app(settings, pipeline, api_settings=api_settings,
                      ingest_embedder=embedder if ingest_embedder is SHARED else ingest_embedder)


def wait_ready(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


def open_client(app, **kwargs):
    from fastapi.testclient import TestClient

    return TestClient(app, headers=AUTH, **kwargs)


@pytest.fixture(scope="module")
def client(api_base_index, embedder, generator, tmp_path_factory):
    """Read-only routes share one app (its own copy of the index, never changed by these tests)."""
    index = tmp_path_factory.mktemp("api-ro") / "index"
    shutil.copytree(api_base_index, index, symlinks=True)
    with open_client(build_app(index, embedder, generator)) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def fresh_client(api_index, embedder, generator):
    """An app of its own over a copy of the index, for tests that upload, delete or change limits."""
    def make(**api_options):
        client = open_client(build_app(api_index, embedder, generator, **api_options))
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    opened = []
    yield make
    for client in opened:
        client.__exit__(None, None, None)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields.get("event"), fields.get("data")))
    return events


def wait_job(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "partial", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


ASK = {"question": "How do I set a timeout on a client?", "max_new_tokens": 8}


# ---------------------------------------------------------------------------------------------- health
def test_healthz_needs_no_key(client):
    response = client.get("/healthz", headers={"Authorization": ""})
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_readyz_says_ready_to_anyone_and_the_details_to_an_admin(client):
    body = client.get("/readyz", headers={"Authorization": ""}).json()
    assert body == {"status": "ready", "reason": None, "checks": {}}
    checks = client.get("/readyz").json()["checks"]  # an environment key: an admin of every collection
    assert checks["models_loaded"] and checks["index_open"] and checks["snapshot"]


def test_readyz_is_503_without_an_index(tmp_path, embedder, generator):
    from api.app import create_app
    from api.config import ApiSettings
    from rag.config import Settings
    from rag.pipeline import Pipeline

    settings = Settings(index_dir=tmp_path / "empty", parse_workers=1)
    app = create_app(settings, Pipeline(settings, generator=generator), api_settings=ApiSettings(index_poll_s=0),
                     ingest_embedder=embedder)
    with open_client(app) as client:
        deadline = time.monotonic() + 60
        while not client.get("/readyz").json()["checks"].get("models_loaded"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = client.get("/readyz")
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert response.json()["reason"] == "No index yet: ingest or upload documents."
        assert "No index" in response.json()["checks"]["error"]  # the operator's detail (auth is off)
        search = client.post("/v1/search", json={"query": "timeouts"})
        assert search.status_code == 503 and search.json()["error"]["code"] == "index_unavailable"


def test_metrics_count_requests_by_route_and_status(client):
    client.post("/v1/search", json={"query": "timeouts", "k": 1})
    client.post("/v1/search", json={"query": "", "k": 1})
    text = client.get("/metrics", headers={"Authorization": ""}).text
    assert 'rag_http_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert 'rag_http_requests_total{method="POST",route="/v1/search",status="422"}' in text
    assert "rag_http_request_seconds_bucket" in text and "rag_retrieval_seconds_count" in text
    assert "rag_generations_running" in text and "rag_tokens_total" in text


# ---------------------------------------------------------------------------------------------- auth
def test_v1_without_key_is_401(client):
    response = client.post("/v1/search", json={"query": "timeouts"}, headers={"Authorization": ""})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "missing_api_key"


def test_v1_with_unknown_key_is_401(client):
    response = client.get("/v1/models", headers={"Authorization": "Bearer not-a-key"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_revoked_key_is_403(client):
    response = client.get("/v1/models", headers={"Authorization": "", "X-API-Key": REVOKED})
    assert response.status_code == 403 and response.json()["error"]["code"] == "revoked_api_key"


def test_x_api_key_header_and_any_configured_key_work(client):
    response = client.get("/v1/models", headers={"Authorization": "", "X-API-Key": OTHER_KEY})
    assert response.status_code == 200


def test_keys_never_appear_in_logs(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.get("/v1/models")
        client.get("/v1/models", headers={"Authorization": "", "X-API-Key": REVOKED})
    assert caplog.records, "requests are logged"
    logged = "\n".join(f"{record.getMessage()} {vars(record)}" for record in caplog.records)
    assert KEY not in logged and REVOKED not in logged


def test_auth_is_off_without_configured_keys(api_index, embedder, generator, caplog):
    from api.app import create_app
    from api.config import ApiSettings
    from rag.config import Settings
    from rag.pipeline import Pipeline
    from rag.retrieve import Retriever
    from rag.store import Store
    from fastapi.testclient import TestClient

    settings = Settings(index_dir=api_index)
    pipeline = Pipeline(settings, retriever=Retriever(Store.open(api_index), embedder), generator=generator)
    with caplog.at_level(logging.WARNING, logger="rag.api"):
        with TestClient(create_app(settings, pipeline, api_settings=ApiSettings(api_keys="", index_poll_s=0))) as c:
            wait_ready(c)
            assert c.get("/v1/models").status_code == 200
    assert any("no API keys configured" in record.getMessage() for record in caplog.records)


def test_keys_file_and_comments(tmp_path):
    from api.auth import ApiKeys
    from api.config import ApiSettings

    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalpha\n\nbeta  # ci\n")
    keys = ApiKeys.from_settings(ApiSettings(api_keys="gamma", api_keys_file=keys_file, revoked_api_keys="beta"))
    assert [keys.check(k) for k in ("alpha", "gamma", "beta", "delta")] == ["ok", "ok", "revoked", "unknown"]


# ---------------------------------------------------------------------------------------------- /v1/ask
def test_ask_returns_answer_citations_usage_timings(client):
    response = client.post("/v1/ask", json=ASK)
    assert response.status_code == 200
    body = response.json()
    assert body["answer"] and body["path"] == "rag"
    assert body["sources"] and all(s["source"].endswith(".md") for s in body["sources"])
    assert all(c["number"] >= 1 for c in body["citations"])
    assert 0 < body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0
    assert {"retrieve_ms", "prompt_ms", "generate_ms"} <= set(body["timings"])


def test_ask_prompt_only_path_does_not_retrieve(client):
    body = client.post("/v1/ask", json={**ASK, "path": "prompt"}).json()
    assert body["path"] == "prompt" and body["sources"] == [] and "retrieve_ms" not in body["timings"]


def test_ask_stream_sends_tokens_then_the_answer(client):
    response = client.post("/v1/ask", json={**ASK, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [name for name, _ in events[:-1]] == ["token"] * (len(events) - 1) and len(events) >= 2
    name, data = events[-1]
    final = json.loads(data)
    assert name == "answer" and final["sources"] and "usage" in final and "citations" in final
    assert final["raw_text"].strip() == "".join(json.loads(d)["text"] for _, d in events[:-1]).strip()


@pytest.mark.parametrize("change, reason", [
    ({"question": ""}, "question"),
    ({"question": "   "}, "must not be empty"),
    ({"question": "x" * 2001}, "at most 2000 characters"),
    ({"k": 0}, "body.k"),
    ({"k": 51}, "body.k"),
    ({"path": "telepathy"}, "'prompt', 'rag', 'finetuned' or 'finetuned-rag'"),
    ({"retriever": "psychic"}, "'dense', 'bm25' or 'hybrid'"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": [""]}, "stop"),
    ({"colour": "blue"}, "Extra inputs are not permitted"),
])
def test_ask_validation_is_422_with_the_reason(client, change, reason):
    response = client.post("/v1/ask", json={**ASK, **change})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error" and reason in error["message"]


def test_malformed_json_is_422(client):
    response = client.post("/v1/ask", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"


def test_max_new_tokens_is_bounded_by_the_server_limit_not_the_schema(client, fresh_client):
    over = client.post("/v1/ask", json={**ASK, "max_new_tokens": 2000})  # the default limit is 1024
    assert over.status_code == 422 and "at most 1024 on this server" in over.json()["error"]["message"]
    roomy = fresh_client(max_new_tokens_limit=4096)  # RAG_MAX_NEW_TOKENS_LIMIT above 1024 takes effect
    response = roomy.post("/v1/ask", json={**ASK, "path": "prompt", "max_new_tokens": 2000, "stop": ["."]})
    assert response.status_code == 200, response.json()


def test_finish_reason_is_the_decoders(client):
    cut = client.post("/v1/ask", json={**ASK, "path": "prompt", "max_new_tokens": 2}).json()
    assert cut["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2
    # A stop sequence ends the reply before the limit: the decoder says "stop", whatever the token count.
    body = client.post("/v1/chat/completions", json={**CHAT, "model": "rag-prompt-only", "max_tokens": 64,
                                                     "stop": [" "]}).json()
    assert body["choices"][0]["finish_reason"] == "stop"


def test_finetuned_path_without_adapter_is_422(client):
    response = client.post("/v1/ask", json={**ASK, "path": "finetuned"})
    assert response.status_code == 422 and "adapter" in response.json()["error"]["message"]


def test_full_queue_is_503_with_retry_after(fresh_client):
    client = fresh_client(max_concurrent_generations=1, max_queue=0, retry_after_s=7)
    limiter = client.app.state.service.limiter
    granted = client.portal.call(limiter.acquire)  # the only slot is taken, and no one may wait
    try:
        for request in ({"url": "/v1/ask", "json": ASK}, {"url": "/v1/ask", "json": {**ASK, "stream": True}},
                        {"url": "/v1/chat/completions",
                         "json": {"model": "rag", "messages": [{"role": "user", "content": "timeouts?"}]}}):
            response = client.post(**request)
            assert response.status_code == 503 and response.headers["Retry-After"] == "7"
            assert response.json()["error"]["code"] == "overloaded"
        assert client.post("/v1/search", json={"query": "timeouts"}).status_code == 200  # search is not queued
    finally:
        limiter.release(granted)
    assert client.post("/v1/ask", json=ASK).status_code == 200
    assert "rag_generations_rejected_total 3.0" in client.get("/metrics").text


# ---------------------------------------------------------------------------------------------- /v1/search
def test_search_ranks_chunks(client):
    body = client.post("/v1/search", json={"query": "How do I set a timeout?", "k": 3}).json()
    results = body["results"]
    assert [hit["rank"] for hit in results] == [1, 2, 3]
    assert any("timeout" in hit["text"].lower() for hit in results)
    assert {"chunk_id", "doc_id", "source", "score", "scores"} <= set(results[0]) and body["timings"]["retrieve_ms"] > 0


@pytest.mark.parametrize("retriever", ["dense", "bm25", "hybrid"])
def test_search_each_retriever_and_source_filter(client, retriever):
    body = client.post("/v1/search", json={"query": "exceptions raised", "k": 2, "retriever": retriever,
                                           "source": "*exceptions.md"}).json()
    assert body["results"] and all(hit["source"].endswith("exceptions.md") for hit in body["results"])


@pytest.mark.parametrize("payload", [{"query": ""}, {"query": "x", "k": 0}, {"query": "x", "k": 51},
                                     {"query": "x", "retriever": "nope"}, {}, {"query": "x" * 2001}])
def test_search_validation_is_422(client, payload):
    assert client.post("/v1/search", json=payload).status_code == 422


# ---------------------------------------------------------------------------------------------- OpenAI-compatible
CHAT = {"model": "rag", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "How do I set a timeout on a client?"}],
        "max_tokens": 8}


def test_models_lists_the_paths(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["rag", "rag-prompt-only"]


def test_chat_completion_with_citations(client):
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["object"] == "chat.completion" and body["model"] == "rag"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert isinstance(body["citations"], list)


def test_chat_completion_stream_chunks_and_done(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "rag-prompt-only", "stream": True})
    events = [data for _, data in sse_events(response.text)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "citations" in chunks[-1]


@pytest.mark.parametrize("change, status", [
    ({"model": "gpt-4"}, 404),
    ({"model": "rag-finetuned"}, 422),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 422),
    ({"messages": []}, 422),
    ({"n": 2}, 422),
    ({"max_tokens": 0}, 422),
])
def test_chat_completion_errors(client, change, status):
    response = client.post("/v1/chat/completions", json={**CHAT, **change})
    assert response.status_code == status and response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- documents and jobs
def test_list_documents(client):
    body = client.get("/v1/documents").json()
    assert len(body["documents"]) == 3 and body["counts"]["documents"] == 3 and body["snapshot"]
    assert {"doc_id", "source", "chunk_count", "size", "content_hash", "ingested_at"} <= set(body["documents"][0])


def test_upload_ingests_in_background_then_delete(fresh_client):
    client = fresh_client()
    text = b"# Quokka mode\n\nThe quokka-mode switch makes every retry hop like a marsupial.\n"
    response = client.post("/v1/documents", files=[("files", ("../../etc/Quokka notes.md", text, "text/markdown")),
                                                   ("files", ("signed.pdf", report_with_scanned_pages(),
                                                              "application/pdf"))])
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["files"] == ["etc_Quokka_notes-1aa15644.md", "signed.pdf"]  # the client's path kept, and changed
    job = wait_job(client, accepted["job_id"])
    assert job["status"] == "succeeded" and job["progress"] == {"files_total": 2, "files_done": 2}
    assert [f["status"] for f in job["files"]] == ["new", "new"] and job["snapshot"]
    # the PDF's scanned signature pages held nothing to index: the uploader is told, the rest is ingested
    assert [len(f["warnings"]) for f in job["files"]] == [0, 1] and job["files"][1]["chunks"] > 0
    assert job["files"][1]["warnings"][0].endswith("not indexed: page 2, 4")
    uploads = client.app.state.ingest.runner.collection_dir("default").resolve()
    # sanitised: inside the upload area, and shown by that name (never the server's path)
    assert all((uploads / f["filename"]).is_file() and f["source"] == f["filename"] for f in job["files"])

    hit = client.post("/v1/search", json={"query": "quokka-mode marsupial", "k": 1}).json()["results"][0]
    assert hit["source"].endswith("etc_Quokka_notes-1aa15644.md")
    listed = {Path(d["source"]).name: d for d in client.get("/v1/documents").json()["documents"]}
    assert len(listed) == 5 and listed["signed.pdf"]["warnings"] == job["files"][1]["warnings"]
    assert listed["etc_Quokka_notes-1aa15644.md"]["warnings"] == []

    doc_id = job["files"][0]["doc_id"]
    deleted = client.delete(f"/v1/documents/{doc_id}")
    assert deleted.status_code == 200 and deleted.json()["doc_id"] == doc_id
    assert len(client.get("/v1/documents").json()["documents"]) == 4
    assert client.delete(f"/v1/documents/{doc_id}").status_code == 404


def test_reupload_replaces_the_document(fresh_client):
    client = fresh_client()
    first = client.post("/v1/documents", files={"files": ("note.md", b"# Note\n\nVersion one of the note.\n")})
    wait_job(client, first.json()["job_id"])
    second = client.post("/v1/documents", files={"files": ("note.md", b"# Note\n\nVersion two, rewritten.\n")})
    job = wait_job(client, second.json()["job_id"])
    assert job["files"][0]["status"] == "changed"
    assert len(client.get("/v1/documents").json()["documents"]) == 4


def test_the_same_bytes_under_another_name_are_a_duplicate_not_a_second_document(fresh_client, api_index):
    client = fresh_client()
    note = b"# Ferry\n\nThe ferry to the island leaves at nine and returns at five.\n"
    first = wait_job(client, client.post("/v1/documents", files={"files": ("ferry.md", note)}).json()["job_id"])
    chunks = client.get("/v1/documents").json()["counts"]["chunks"]
    again = wait_job(client, client.post("/v1/documents", files={"files": ("ferry-copy.md", note)}).json()["job_id"])
    (outcome,) = again["files"]
    assert again["status"] == "succeeded" and outcome["status"] == "duplicate" and outcome["chunks"] == 0
    assert outcome["duplicate_of"] == first["files"][0]["doc_id"] and "ferry.md" in outcome["error"]
    listed = client.get("/v1/documents").json()
    assert listed["counts"]["chunks"] == chunks and "ferry-copy.md" not in {d["source"] for d in listed["documents"]}
    assert not (api_index / "uploads" / "default" / "ferry-copy.md").exists()  # one copy kept on disk
    # A changed file under a known name still replaces it.
    changed = client.post("/v1/documents", files={"files": ("ferry.md", note + b"\nOn Sundays it does not run.\n")})
    assert wait_job(client, changed.json()["job_id"])["files"][0]["status"] == "changed"


def test_failed_file_is_reported_per_file(fresh_client):
    client = fresh_client()
    response = client.post("/v1/documents", files={"files": ("broken.pdf", b"%PDF-1.4 not really a pdf")})
    job = wait_job(client, response.json()["job_id"])
    assert job["status"] == "partial" and job["error"] == "1 of 1 files failed"
    assert job["files"][0]["status"] == "failed" and job["files"][0]["error"]


def test_unsupported_type_is_415(client):
    response = client.post("/v1/documents", files=[("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream"))])
    assert response.status_code == 415 and ".md" in response.json()["error"]["message"]


def test_upload_over_the_limit_is_413(fresh_client):
    client = fresh_client(max_upload_mb=0.01)
    response = client.post("/v1/documents", files={"files": ("big.txt", b"a" * 20_000, "text/plain")})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert not list(client.app.state.settings.upload_root.rglob("*.txt"))


def test_upload_without_files_is_422(client):
    assert client.post("/v1/documents", data={"note": "no files"}).status_code == 422


def test_duplicate_names_are_422(client):
    response = client.post("/v1/documents", files=[("files", ("a.md", b"# A\n")), ("files", ("a.md", b"# B\n"))])
    assert response.status_code == 422 and response.json()["error"]["code"] == "duplicate_filename"


def test_delete_while_another_writer_holds_the_index_is_409(fresh_client, api_index):
    import fcntl

    client = fresh_client()
    doc_id = client.get("/v1/documents").json()["documents"][0]["doc_id"]
    with open(api_index / ".lock", "w") as lock:  # what `rag ingest` in another process holds while it writes
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        response = client.delete(f"/v1/documents/{doc_id}")
    assert response.status_code == 409 and response.json()["error"]["code"] == "index_busy"
    assert "Retry-After" in response.headers and "Another process" in response.json()["error"]["message"]
    assert client.delete(f"/v1/documents/{doc_id}").status_code == 200  # the lock is gone: it goes through


def test_unknown_job_and_document_are_404(client):
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.delete("/v1/documents/0000000000000000").status_code == 404


def test_sanitize_filename():
    from api.jobs import sanitize_filename

    assert sanitize_filename("../../etc/passwd") == "etc_passwd-3754d6cb"
    assert sanitize_filename("..\\..\\win.ini") == "win-c779783d.ini"
    assert sanitize_filename(".hidden.md") == "hidden-1f38d3ab.md"
    assert sanitize_filename("[a]*?.md") == "a_-2d855da5.md"
    assert sanitize_filename("") == "upload-e3b0c442"
    assert sanitize_filename("notes.md") == "notes.md"  # a safe name is kept as it is: uploading it again replaces it
    assert len(sanitize_filename("x" * 500 + ".md")) <= 128


# ---------------------------------------------------------------------------------------------- cross-cutting
def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\n"}).headers["X-Request-ID"]
    assert made != "bad id\n" and len(made) == 32
    error = client.post("/v1/search", json={}, headers={"X-Request-ID": "req-9"}).json()["error"]
    assert error["request_id"] == "req-9"


def test_unknown_route_and_method_use_the_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = client.get("/v1/search")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_unexpected_error_is_500_without_trace(fresh_client, monkeypatch):
    from fastapi.testclient import TestClient

    client = fresh_client()
    quiet = TestClient(client.app, headers=AUTH, raise_server_exceptions=False)
    quiet.portal = client.portal

    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(client.app.state.service.pipeline, "stream", explode)  # every ask is generated as a stream
    response = quiet.post("/v1/ask", json=ASK)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error" and response.json()["error"]["request_id"]
    assert "secret" not in response.text and "Traceback" not in response.text


def test_no_response_shows_a_path_of_the_server(fresh_client, api_index):
    """Users see documents by name; the index's folder, the corpus's and the uploads area stay on the server."""
    client = fresh_client()
    internal = (str(api_index.parent), str(CORPUS), str(api_index / "uploads"))
    job = client.post("/v1/documents", files={"files": ("ferry-notes.md", b"# Notes\n\nThe ferry leaves at nine.\n")})
    done = wait_job(client, job.json()["job_id"])
    assert done["status"] == "succeeded", done
    hits = client.post("/v1/search", json={"query": "ferry leaves at nine", "k": 3}).json()["results"]
    assert hits[0]["source"] == "ferry-notes.md"
    assert {hit["source"] for hit in hits[1:]} <= {Path(name).name for name in HTTPX_FILES}
    asked = {"question": "How do I set a timeout on a client?", "max_new_tokens": 8, "path": "rag"}
    responses = [job, client.get(f"/v1/jobs/{done['id']}"), client.get("/v1/documents"),
                 client.post("/v1/search", json={"query": "timeouts"}), client.post("/v1/ask", json=asked),
                 client.post("/v1/ask", json={**asked, "stream": True}),
                 client.post("/v1/chat/completions", json={"model": "rag", "max_tokens": 8, "messages": [
                     {"role": "user", "content": asked["question"]}]}),
                 client.get(f"/v1/chunks/{hits[0]['chunk_id']}"), client.get("/readyz", headers={"Authorization": ""}),
                 client.get("/v1/models"), client.get("/"),
                 client.delete(f"/v1/documents/{hits[0]['doc_id']}")]
    for response in responses:
        assert response.status_code < 300, (response.request.url, response.text)
        assert not [path for path in internal if path in response.text], (response.request.url, response.text)
    assert {document["source"] for document in responses[2].json()["documents"]} >= {"ferry-notes.md", "timeouts.md"}
