"""POST /v1/ask: an answer with citations, as one JSON body or as Server-Sent Events.

With `"stream": true` the reply is `text/event-stream`::

    event: token
    data: {"text": "Set"}

    ...

    event: answer
    data: {"answer": "...", "citations": [...], "usage": {...}, "timings": {...}, ...}

A failure after the stream has started is sent as `event: error` with `{"code", "message", "request_id"}`.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from api.answering import EventStreamResponse, answer, generation_params, open_stream, sse
from api.auth import authorize
from api.deps import ServiceDep
from api.observability import current_request_id
from api.schemas import AnswerOut, AskRequest, GenerationOptions
from rag.conversation import Turn
from rag.pipeline import AnswerRequest
from rag.types import Role

logger = logging.getLogger("rag.api")
router = APIRouter(tags=["ask"])

_STREAM_DOC = {"description": "With stream=true: Server-Sent Events (`token` events, then one `answer` event).",
               "content": {"text/event-stream": {}}}


@router.post("/ask", response_model=AnswerOut, summary="Answer a question with citations",
             responses={200: _STREAM_DOC, 503: {"description": "Busy (see Retry-After), loading, or no index."}})
async def ask(body: AskRequest, service: ServiceDep, request: Request):
    collection = authorize(request, body.collection, Role.READ)
    params = generation_params(service, **body.model_dump(include=set(GenerationOptions.model_fields)))
    answer_request = AnswerRequest(body.question, body.path or service.settings.default_path, body.k, body.retriever,
                                   body.source, params, extract=body.extract,
                                   history=tuple(Turn(turn.question, turn.answer) for turn in body.history),
                                   collection=collection)
    if not body.stream:
        return (await answer(service, answer_request, request)).to_dict()

    stream = await open_stream(service, answer_request, request)
    request_id = current_request_id(request.scope)

    async def events():
        try:
            async for item in stream.pieces():
                if isinstance(item, str):
                    yield sse("token", {"text": item})
                else:
                    yield sse("answer", item.to_dict())
        except Exception as error:  # the status line is gone already: report in-band, never a traceback
            logger.error("stream failed", extra={"error": f"{type(error).__name__}: {error}"})
            yield sse("error", {"code": "generation_failed", "message": "Generation failed.",
                                "request_id": request_id})

    return EventStreamResponse(events(), on_close=stream.close)
