"""Running the pipeline for a request: limits, a worker thread, and streaming with cancellation. The library's
errors become HTTP answers in one place, api/errors.py.

Shared by /v1/ask and /v1/chat/completions. Generation holds a slot of the `GenerationLimiter` for its whole
duration (for a stream: until the last event is sent or the client goes away), runs in a worker thread so the
event loop keeps serving, and a stream whose client disconnects stops pulling tokens from the decoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from api.service import Service
from api.threads import run_blocking
from rag.generation import GenerationParams, adapter_for
from rag.pipeline import Answer, AnswerRequest
from rag.types import AnswerPath

logger = logging.getLogger("rag.api")
_DONE = object()


def generation_params(service: Service, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None, stop: list[str] = ()):
    """A request's generation options, within this server's RAG_MAX_NEW_TOKENS_LIMIT."""
    limit = service.api_settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise ApiError(422, "validation_error", f"max_new_tokens: at most {limit} on this server, got {max_new_tokens}.")
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=list(stop))


def check_path(service: Service, path: AnswerPath) -> None:
    """Refuse before queueing what cannot run: no models yet, no index for a retrieving path, no adapter."""
    service.require_models()
    if path.retrieves:
        service.retriever  # noqa: B018  (503 when no index is open)
    adapter_for(path, service.settings)  # NoAdapterConfigured (422) for a fine-tuned path without an adapter


async def answer(service: Service, request: AnswerRequest) -> Answer:
    check_path(service, request.path)
    async with service.limiter.slot():
        result = await run_blocking(service.pipeline.answer, request)
    service.metrics.observe_answer(result.usage, result.timings)
    return result


class AnswerStream:
    """Text pieces, then the final `Answer`, pulled from `Pipeline.stream` one at a time in a worker thread.

    `open()` waits for a generation slot and runs retrieval, prompt building and the first decoder step before
    any byte is sent, so those failures still get a proper status code. `close()` is idempotent: it stops the
    decoder (closing the generator) and frees the slot, whether the stream ended, failed or was abandoned.
    """

    def __init__(self, service: Service, request: AnswerRequest):
        self.service, self.request = service, request
        self._iterator = None
        self._first = None
        self._holding = False

    async def open(self) -> "AnswerStream":
        check_path(self.service, self.request.path)
        await self.service.limiter.acquire()
        self._holding = True
        try:
            self._iterator = self.service.pipeline.stream(self.request)
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
