"""The API over real HTTP: a uvicorn server on 127.0.0.1 (a free port), real clients.

The server runs in a thread of the test process so it can share the session's loaded models; everything between
client and app is real (sockets, uvicorn's HTTP parser, chunked SSE).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import free_port, wait_until_ready
from tests.test_api import AUTH, KEY, api_base_index, build_app  # noqa: F401  (fixture re-exported)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(api_base_index, embedder, generator, tmp_path_factory):  # noqa: F811
    import shutil

    import uvicorn

    index = tmp_path_factory.mktemp("api-server") / "index"
    shutil.copytree(api_base_index, index, symlinks=True)
    # Uploads get the app's own embedder, as in production: the query embedder is busy with queries meanwhile.
    app = build_app(index, embedder, generator, ingest_embedder=None, max_queue=64)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, 60)
    yield base, app
    uv.should_exit = True
    thread.join(30)


def read_sse(response: httpx.Response):
    """(event, data) pairs as they arrive."""
    event, data = None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_sse_stream_over_http(server):
    base, _ = server
    arrivals = []
    with httpx.stream("POST", f"{base}/v1/ask", headers=AUTH, timeout=60,
                      json={"question": "How do I set a timeout on a client?", "max_new_tokens": 8,
                            "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        for event, data in read_sse(response):
            arrivals.append((event, json.loads(data)))
    names = [name for name, _ in arrivals]
    assert names[-1] == "answer" and set(names[:-1]) == {"token"} and len(names) >= 2
    final = arrivals[-1][1]
    assert final["sources"] and 0 < final["usage"]["completion_tokens"] <= 8


def test_openai_client_non_streaming(server):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert {model.id for model in client.models.list()} == {"rag", "rag-prompt-only"}
    reply = client.chat.completions.create(
        model="rag", max_tokens=8, extra_body={"k": 3},
        messages=[{"role": "user", "content": "How do I set a timeout on a client?"}])
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8
    citations = reply.model_extra["citations"]
    assert isinstance(citations, list) and all("source" in c for c in citations)


def test_openai_client_streaming(server):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(
        model="rag-prompt-only", max_tokens=8, stream=True,
        messages=[{"role": "user", "content": "What is HTTPX?"}]))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "citations" in chunks[-1].model_extra


def test_openai_client_sees_auth_errors(server):
    import openai

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def _running(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("rag_generations_running ")))


def test_client_disconnect_stops_the_generation(server):
    base, _ = server
    started = time.monotonic()
    with httpx.stream("POST", f"{base}/v1/ask", headers=AUTH, timeout=60,
                      json={"question": "Tell me everything about HTTPX clients.", "path": "prompt",
                            "max_new_tokens": 96, "stream": True}) as response:
        first = next(read_sse(response))
        assert first[0] == "token"
        assert _running(base) == 1
    # Closed after one token: the slot must come back long before 96 tokens could have been generated.
    deadline = time.monotonic() + 10
    while _running(base) != 0:
        assert time.monotonic() < deadline, "generation slot not released after the client left"
        time.sleep(0.05)
    assert time.monotonic() - started < 15


def test_ingest_while_querying(server):
    """Queries keep succeeding while a job ingests and swaps the snapshot; the new document is then found."""
    base, _ = server
    failures, done, counts = [], threading.Event(), {"search": 0, "ask": 0}

    def query_loop(kind: str) -> None:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
            while not done.is_set():
                if kind == "search":
                    response = http.post("/v1/search", json={"query": "timeouts on a client", "k": 3})
                else:
                    response = http.post("/v1/ask", json={"question": "How do I set a timeout?",
                                                          "max_new_tokens": 4})
                if response.status_code != 200 or (kind == "search" and not response.json()["results"]):
                    failures.append((kind, response.status_code, response.text[:200]))
                counts[kind] += 1

    workers = [threading.Thread(target=query_loop, args=(kind,)) for kind in ("search", "search", "ask")]
    for worker in workers:
        worker.start()
    try:
        text = b"# Wombat retries\n\nThe wombat-backoff setting doubles the wait between retries, up to a minute.\n"
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
            accepted = http.post("/v1/documents", files={"files": ("wombat.md", text, "text/markdown")})
            assert accepted.status_code == 202
            deadline = time.monotonic() + 180
            while (job := http.get(accepted.json()["status_url"]).json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            time.sleep(0.5)  # queries on the new snapshot too
    finally:
        done.set()
        for worker in workers:
            worker.join(60)
    assert job["status"] == "succeeded" and job["files"][0]["status"] == "new"
    assert not failures, failures[:5]
    assert counts["search"] > 0 and counts["ask"] > 0
    hits = httpx.post(f"{base}/v1/search", headers=AUTH, json={"query": "wombat-backoff retries", "k": 1}).json()
    assert hits["results"][0]["source"].endswith("wombat.md")
