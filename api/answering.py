"""Running the pipeline for a request: limits, a worker thread, and cancellation when the client leaves. The
library's errors become HTTP answers in one place, api/errors.py.

Shared by /v1/ask and /v1/chat/completions. Generation holds a slot of the `GenerationLimiter` for its whole
duration (for a stream: until the last event is sent or the client goes away) and runs in a worker thread so the
event loop keeps serving. Every answer, streamed or not, is generated as a stream, because closing a stream is how
the decoder is stopped (the transformers backend's stopping criterion sees the close at the next token; the openai
backend closes its HTTP response). A client that disconnects therefore leaves the queue without generating, or
stops its generation at the next token, and the next request in line gets the slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import VALIDATION_ERROR, ApiError
from api.service import Service
from api.threads import run_blocking
from rag.generation import GenerationParams, adapter_for
from rag.pipeline import Answer, AnswerRequest
from rag.types import AnswerPath

logger = logging.getLogger("rag.api")
T = TypeVar("T")
_DONE = object()
# nginx's status for "client closed request": logged and counted, never seen by the client, who has gone.
CLIENT_CLOSED_REQUEST = 499


def generation_params(service: Service, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None, stop: list[str] = ()):
    """A request's generation options, within this server's RAG_MAX_NEW_TOKENS_LIMIT."""
    limit = service.api_settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise ApiError(422, VALIDATION_ERROR,
                       f"max_new_tokens: at most {limit} on this server, got {max_new_tokens}.")
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=list(stop))


def check_path(service: Service, path: AnswerPath) -> None:
    """Refuse before queueing what cannot run: no models yet, no index for a retrieving path, no adapter."""
    service.require_models()
    if path.retrieves:
        service.retriever  # noqa: B018  (503 when no index is open)
    adapter_for(path, service.settings)  # NoAdapterConfigured (422) for a fine-tuned path without an adapter


async def answer(service: Service, request: AnswerRequest, client: Request) -> Answer:
    """The whole answer, unless the client disconnects first (then 499, and the decoder stops)."""
    stream = AnswerStream(service, request)
    try:
        return await while_connected(client, stream.collect)
    finally:
        await stream.close()


async def open_stream(service: Service, request: AnswerRequest, client: Request) -> AnswerStream:
    """An opened `AnswerStream`, unless the client disconnects while it waits for a slot or its first token."""
    return await while_connected(client, AnswerStream(service, request).open)


async def while_connected(client: Request, work: Callable[[], Awaitable[T]]) -> T:
    """`await work()`, cancelled when the client disconnects first, and then a 499 `ApiError`.

    A listener task waits for the server's `http.disconnect` message (the body has been read, so nothing else
    comes) rather than polling. It is a bare task, not a task group, so that `work`'s own errors (Busy, library
    errors) reach their handlers unwrapped. `work` must clean up on cancellation (`AnswerStream.open` does)."""
    with anyio.CancelScope() as connected:
        listener = asyncio.ensure_future(_cancel_on_disconnect(client, connected))
        try:
            return await work()
        finally:
            listener.cancel()
    raise ApiError(CLIENT_CLOSED_REQUEST, "client_disconnected",
                   "The client closed the connection before the answer was ready.")


async def _cancel_on_disconnect(client: Request, scope: anyio.CancelScope) -> None:
    while (await client.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class AnswerStream:
    """Text pieces, then the final `Answer`, pulled from `Pipeline.stream` one at a time in a worker thread.

    `open()` waits for a generation slot and runs retrieval, prompt building and the first decoder step before
    any byte is sent, so those failures still get a proper status code. `close()` is idempotent: it stops the
    decoder (closing the generator) and frees the slot, whether the stream ended, failed or was abandoned; an
    abandoned one is counted in `rag_generations_cancelled_total`.
    """

    def __init__(self, service: Service, request: AnswerRequest):
        self.service, self.request = service, request
        self._iterator = None
        self._first = None
        self._granted: float | None = None  # when the slot was granted, while it is held
        self._ended = False  # the answer came, or the pipeline failed: closing stops nothing

    async def open(self) -> AnswerStream:
        check_path(self.service, self.request.path)
        try:
            self._granted = await self.service.limiter.acquire()
        except anyio.get_cancelled_exc_class():
            self.service.metrics.cancelled.labels("queued").inc()
            raise
        try:
            self._iterator = self.service.pipeline.stream(self.request)
            self._first = await self._next()
        except BaseException:
            await self.close()
            raise
        return self

    async def pieces(self) -> AsyncIterator[str | Answer]:
        item = self._first
        while item is not _DONE:
            yield item
            item = await self._next()

    async def collect(self) -> Answer:
        """Opens the stream and reads it up to the final `Answer` (`Pipeline.stream` always ends with one)."""
        await self.open()
        item = self._first
        while isinstance(item, str):
            item = await self._next()
        return item

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._iterator is not None:
                iterator, self._iterator = self._iterator, None
                if not self._ended:
                    self.service.metrics.cancelled.labels("generating").inc()
                await run_blocking(iterator.close)
            if self._granted is not None:
                granted, self._granted = self._granted, None
                self.service.limiter.release(granted)

    async def _next(self) -> str | Answer | object:
        try:
            item = await run_blocking(next, self._iterator, _DONE)
        except Exception:
            self._ended = True
            raise
        if isinstance(item, Answer):
            self._ended = True
            self.service.metrics.observe_answer(item.usage, item.timings)
        return item


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
