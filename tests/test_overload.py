"""Generation under load: a client that leaves stops its generation (queued or running), a wait past the queue
deadline is a 503 with Retry-After rather than a client time-out, and /metrics shows the queue.

The HTTP tests run a real uvicorn server on 127.0.0.1 over the packaged decoder, made long-winded and slow (every
reply runs to max_new_tokens, at least TOKEN_DELAY_S a token) so that an abandoned generation would hold the only slot for
seconds. Cancellation goes through the real transformers backend: its stopping criterion sees the closed stream.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from api.limiter import Busy, GenerationLimiter
from tests.conftest import serving
from tests.test_api import AUTH, api_base_index, build_app  # noqa: F401  (fixture re-exported)
from tests.test_api_server import read_sse

TOKEN_DELAY_S = 0.05
LONG_TOKENS = 200  # ≥ 10 s of generation: what an abandoned request would keep the slot for
PATIENT_S = 60.0  # queue deadlines
IMPATIENT_S = 2.0
LONG = {"question": "Tell me everything about HTTPX clients.", "path": "prompt", "max_new_tokens": LONG_TOKENS}
SHORT = {"question": "What is HTTPX?", "path": "prompt", "max_new_tokens": 4}
LEAVE_AFTER = httpx.Timeout(60, read=1.0)  # a client that gives up after a second without an answer


# ---------------------------------------------------------------------------------------------- the limiter
def limiter_with(waits: list[float], **options) -> GenerationLimiter:
    return GenerationLimiter(**{"max_concurrent": 1, "max_queue": 4, "queue_timeout": 30, "retry_after": 2,
                                "on_wait": waits.append, **options})


def test_a_wait_past_the_deadline_is_refused():
    async def scenario() -> None:
        waits: list[float] = []
        limiter = limiter_with(waits, queue_timeout=0.2)
        await limiter.acquire()
        started = time.monotonic()
        with pytest.raises(Busy, match="RAG_QUEUE_TIMEOUT_S") as refused:
            await limiter.acquire()
        assert 0.2 <= time.monotonic() - started < 2
        assert refused.value.retry_after == 2  # no generation timed yet: the configured Retry-After
        assert limiter.waiting == 0 and len(waits) == 2 and waits[1] >= 0.2

    asyncio.run(scenario())


def test_retry_after_and_early_refusal_follow_the_recent_generation_times():
    async def scenario() -> None:
        limiter = limiter_with([], queue_timeout=25, max_queue=3)
        limiter.release(await limiter.acquire() - 9.9)  # a generation that held its slot for 9.9 s
        await limiter.acquire()
        assert limiter.expected_wait() == pytest.approx(9.9, abs=0.05)
        queued = [asyncio.create_task(limiter.acquire()) for _ in range(2)]  # expected 9.9 s and 19.8 s: they wait
        await asyncio.sleep(0.01)
        assert limiter.waiting == 2
        with pytest.raises(Busy, match="RAG_QUEUE_TIMEOUT_S") as refused:  # 29.7 s expected: refused at once
            await limiter.acquire()
        assert refused.value.retry_after == 30
        limiter.queue_timeout = 60
        queued.append(asyncio.create_task(limiter.acquire()))
        await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="RAG_MAX_QUEUE") as refused:
            await limiter.acquire()
        assert refused.value.retry_after == 40  # four turns of 9.9 s ahead of it
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        assert limiter.waiting == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- over HTTP
class LongWinded:
    """A decoder model that answers every request with exactly max_new_tokens tokens (end of turn suppressed until
    then), slowly: `TransformersGenerator` runs it through its own generate call and stopping criteria."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        from transformers import LogitsProcessor, LogitsProcessorList

        class Slow(LogitsProcessor):
            def __call__(self, input_ids, scores):
                time.sleep(TOKEN_DELAY_S)
                return scores

        return self._model.generate(**kwargs, min_new_tokens=kwargs["max_new_tokens"],
                                    logits_processor=LogitsProcessorList([Slow()]))


@pytest.fixture(scope="module")
def slow_generator(generator):
    from rag.generation import GenerationParams, TransformersGenerator

    slow = TransformersGenerator.from_loaded(LongWinded(generator.model), generator.tokenizer, "cpu",
                                             generator.model_name)
    slow.generate([{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=2))  # first-call costs
    return slow


def serving_over(index: Path, embedder, generator, **api_options):
    """The app over `index` (one generation at a time, up to 4 waiting) on a real server; `with` yields its URL."""
    app = build_app(index, embedder, generator, max_concurrent_generations=1, max_queue=4, **api_options)
    return serving(app, ready_s=60)


@pytest.fixture(scope="module")
def server(api_base_index, embedder, slow_generator, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    """A server that lets requests wait long (PATIENT_S)."""
    index = tmp_path_factory.mktemp("overload") / "index"
    shutil.copytree(api_base_index, index, symlinks=True)
    with serving_over(index, embedder, slow_generator, queue_timeout_s=PATIENT_S) as base:
        yield base


@pytest.fixture
def impatient_server(api_base_index, embedder, slow_generator, tmp_path) -> Iterator[str]:  # noqa: F811
    """A server of its own (no generation timed yet) that lets requests wait IMPATIENT_S at most."""
    shutil.copytree(api_base_index, tmp_path / "index", symlinks=True)
    with serving_over(tmp_path / "index", embedder, slow_generator, queue_timeout_s=IMPATIENT_S) as base:
        yield base


def metric(base: str, name: str) -> float:
    """A sample's value from /metrics (0 when the series has no sample yet)."""
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


@pytest.fixture
def idle(server) -> str:
    """The server with nothing running or queued (what an earlier test left has stopped)."""
    wait_for(lambda: metric(server, "rag_generations_running") == 0 and metric(server, "rag_generations_waiting") == 0)
    return server


@contextmanager
def holding_the_slot(base: str) -> Iterator[None]:
    """A long streaming ask that has begun to answer, kept open with its reply unread until the block ends."""
    with httpx.stream("POST", f"{base}/v1/ask", headers=AUTH, json={**LONG, "stream": True}, timeout=120) as reply:
        events = read_sse(reply)  # not a temporary: closing the reader would close the connection
        assert next(events)[0] == "token"
        yield


def next_ask_delay(base: str) -> tuple[float, float]:
    """Asks a short question; (seconds it took beyond its own generation, seconds a token takes now). The
    machine's pace varies with its load, so delays are judged in tokens."""
    started = time.monotonic()
    response = httpx.post(f"{base}/v1/ask", headers=AUTH, json=SHORT, timeout=120)
    assert response.status_code == 200, response.text
    generating = response.json()["timings"]["generate_ms"] / 1000
    return time.monotonic() - started - generating, generating / SHORT["max_new_tokens"]


def assert_not_kept_waiting(delay: float, token_s: float) -> None:
    """An abandoned generation left ≥ 190 tokens; waiting out a few of them (the token being computed when the
    client left, and the prompt) is the most a stopped one may cost the next request."""
    assert delay < 10 * token_s + 2, f"the next ask waited {delay:.1f} s, at {token_s:.2f} s a token"


@pytest.mark.slow
def test_an_abandoned_ask_stops_generating(idle):
    cancelled = metric(idle, 'rag_generations_cancelled_total{stage="generating"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{idle}/v1/ask", headers=AUTH, json=LONG, timeout=LEAVE_AFTER)
    assert_not_kept_waiting(*next_ask_delay(idle))
    assert metric(idle, 'rag_generations_cancelled_total{stage="generating"}') == cancelled + 1


@pytest.mark.slow
def test_an_abandoned_streaming_ask_leaves_the_queue_without_generating(idle):
    cancelled = metric(idle, 'rag_generations_cancelled_total{stage="queued"}')
    with holding_the_slot(idle):
        with pytest.raises(httpx.ReadTimeout):  # queued behind it, and gone before its turn
            httpx.post(f"{idle}/v1/ask", headers=AUTH, json={**LONG, "stream": True}, timeout=LEAVE_AFTER)
        wait_for(lambda: metric(idle, 'rag_generations_cancelled_total{stage="queued"}') == cancelled + 1)
    assert_not_kept_waiting(*next_ask_delay(idle))  # neither the first stream nor the queued one generates on


@pytest.mark.slow
def test_metrics_show_the_queue_depth_and_wait(impatient_server):
    base, refused = impatient_server, []
    with holding_the_slot(base):
        queued = threading.Thread(target=lambda: refused.append(
            httpx.post(f"{base}/v1/ask", headers=AUTH, json=SHORT, timeout=60).status_code))
        queued.start()
        wait_for(lambda: metric(base, "rag_generations_waiting") == 1)
        queued.join(IMPATIENT_S + 10)
    assert refused == [503]
    assert metric(base, "rag_generations_waiting") == 0
    assert metric(base, "rag_generation_queue_wait_seconds_count") == 2  # the one served at once, the one refused
    assert metric(base, "rag_generation_queue_wait_seconds_sum") >= IMPATIENT_S - 0.05  # a timer may fire a tick early


@pytest.mark.slow
def test_a_wait_past_the_queue_deadline_is_503_with_retry_after(impatient_server):
    base = impatient_server
    with holding_the_slot(base):
        started = time.monotonic()
        response = httpx.post(f"{base}/v1/chat/completions", headers=AUTH, timeout=60,
                              json={"model": "rag-prompt-only", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "What is HTTPX?"}]})
        waited = time.monotonic() - started
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
    assert "RAG_QUEUE_TIMEOUT_S" in response.json()["error"]["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert IMPATIENT_S <= waited < IMPATIENT_S + 5  # refused at the deadline, not left to time out
