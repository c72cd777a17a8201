"""Running the pipeline for a request: limits, a worker thread, error mapping, and streaming with cancellation.

Shared by /v1/ask and /v1/chat/completions. Generation holds a slot of the `GenerationLimiter` for its whole
duration (for a stream: until the last event is sent or the client goes away), runs in a worker thread so the
event loop keeps serving, and a stream whose client disconnects stops pulling tokens from the decoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio
from api.threads import run_blocking
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from api.service import Service
from rag.pipeline import Answer, AnswerPath

logger = logging.getLogger("rag.api")
_DONE = object()


def generation_params(service: Service, max_new_tokens: int, temperature: float, top_k: int | None,
                      top_p: float | None, seed: int | None, stop: list[str]):
    from rag.generate import GenerationParams

    limit = service.api_settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise ApiError(422, "validation_error", f"max_new_tokens: at most {limit} on this server, got {max_new_tokens}.")

    with domain_errors():
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop=list(stop))


@contextmanager
def domain_errors() -> Iterator[None]:
    """The library's errors as HTTP answers: the caller's mistake → 422, a missing dependency → 503."""
    from rag.generate import GeneratorUnavailable, NoAdapterConfigured
    from rag.models import ModelNotFoundError
    from rag.store import StoreError

    try:
        yield
    except NoAdapterConfigured as error:
        raise ApiError(422, "path_unavailable", str(error)) from None
    except GeneratorUnavailable as error:
        raise ApiError(503, "generator_unavailable", str(error), headers={"Retry-After": "5"}) from None
    except (StoreError, ModelNotFoundError) as error:
        raise ApiError(503, "index_unavailable", str(error), headers={"Retry-After": "5"}) from None
    except ValueError as error:  # the library's contract: ValueError means bad input (empty, too long, ...)
        raise ApiError(422, "invalid_request", str(error)) from None


def check_path(service: Service, path: AnswerPath) -> None:
    """Refuse before queueing what cannot run: no models yet, no index for a retrieving path, no adapter."""
    service.require_models()
    if path.retrieves:
        service.retriever  # noqa: B018  (503 when no index is open)
    if path.finetuned and not service.settings.adapter:
        raise ApiError(422, "path_unavailable", f"The '{path.value}' path needs a LoRA adapter and this server has "
                       "none (set RAG_ADAPTER_DIR). Available paths: prompt, rag.")


def answer_to_dict(answer: Answer) -> dict:
    data = answer.to_dict()
    return {"answer": data["text"], "path": data["path"], "citations": data["citations"],
            "sources": data["sources"], "usage": data["usage"],
            "timings": {key: round(value, 3) for key, value in data["timings"].items()},
            "raw_text": data["raw_text"], "answerable": data["answerable"], "confidence": data["confidence"],
            "see_also": data["see_also"], "searched": data["searched"]}


async def answer(service: Service, question: str, path: AnswerPath, **options) -> Answer:
    check_path(service, path)
    async with service.limiter.slot():
        with domain_errors():
            result = await run_blocking(service.pipeline.answer, question, path, **options)
    service.metrics.observe_answer(result.usage, result.timings)
    return result


class AnswerStream:
    """Text pieces, then the final `Answer`, pulled from `Pipeline.stream` one at a time in a worker thread.

    `open()` waits for a generation slot and runs retrieval, prompt building and the first decoder step before
    any byte is sent, so those failures still get a proper status code. `close()` is idempotent: it stops the
    decoder (closing the generator) and frees the slot, whether the stream ended, failed or was abandoned.
    """

    def __init__(self, service: Service, question: str, path: AnswerPath, **options):
        self.service, self.question, self.path, self.options = service, question, path, options
        self._iterator = None
        self._first = None
        self._holding = False

    async def open(self) -> "AnswerStream":
        check_path(self.service, self.path)
        await self.service.limiter.acquire()
        self._holding = True
        try:
            self._iterator = self.service.pipeline.stream(self.question, self.path, **self.options)
            with domain_errors():
                self._first = await run_blocking(next, self._iterator, _DONE)
        except BaseException:
            await self.close()
            raise
        return self

    async def pieces(self) -> AsyncIterator[str | Answer]:
        item = self._first
        while item is not _DONE:
            if isinstance(item, Answer):
                self.service.metrics.observe_answer(item.usage, item.timings)
            yield item
            item = await run_blocking(next, self._iterator, _DONE)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._iterator is not None:
                iterator, self._iterator = self._iterator, None
                await run_blocking(iterator.close)
            if self._holding:
                self._holding = False
                self.service.limiter.release()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that runs `on_close` however the response ends (done, error, client gone)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def sse(event: str | None, data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
