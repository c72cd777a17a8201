"""OpenAI-compatible chat completions, so existing OpenAI clients and tools can talk to the service.

Models are the answer paths: `rag`, `rag-prompt-only`, `rag-finetuned`, `rag-finetuned-rag`. The last user message
is the question; the user/assistant turns before it are the conversation (a follow-up is made standalone before
retrieval, and the turns enter the prompt as far as its token budget allows). Replies carry extra top-level
`citations`, `evidence` and `supported` fields (in the final chunk when streaming). Non-standard options go in the body too (`k`, `retriever`,
`source`, `top_k`, and `collection`, the collection to answer from; with the openai client:
`extra_body={"k": 3, "collection": "handbook"}`).

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    reply = client.chat.completions.create(model="rag", messages=[{"role": "user", "content": "..."}])
    reply.choices[0].message.content, reply.model_extra["citations"], reply.model_extra["evidence"]
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, Request

from api.answering import EventStreamResponse, answer, generation_params, open_stream, sse
from api.auth import authorize
from api.config import MAX_QUESTION_CHARS
from api.deps import ServiceDep
from api.errors import VALIDATION_ERROR, ApiError
from api.observability import current_request_id
from api.schemas import ChatCompletionRequest, ModelCard, ModelList
from rag.conversation import Turn
from rag.generation import DEFAULT_MAX_NEW_TOKENS, available_paths
from rag.pipeline import AnswerRequest
from rag.types import AnswerPath, Role

logger = logging.getLogger("rag.api")
router = APIRouter(tags=["openai"])

MODELS = {"rag": AnswerPath.RAG, "rag-prompt-only": AnswerPath.PROMPT, "rag-finetuned": AnswerPath.FINETUNED,
          "rag-finetuned-rag": AnswerPath.FINETUNED_RAG}
STARTED = int(time.time())


def _available(service) -> list[str]:
    paths = available_paths(service.settings)
    return [name for name, path in MODELS.items() if path in paths]


def conversation_turns(messages) -> tuple[Turn, ...]:
    """The (user, assistant) exchanges before the last user message, oldest first."""
    users = [index for index, message in enumerate(messages) if message.role == "user"]
    turns, asked = [], None
    for message in messages[: users[-1] if users else 0]:
        if message.role == "user":
            asked = message.text()
        elif message.role == "assistant" and asked is not None:
            turns.append(Turn(asked, message.text()))
            asked = None
    return tuple(turns)


@router.get("/models", response_model=ModelList, summary="The answer paths this server offers, as models")
async def models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=name, created=STARTED) for name in _available(service)])


@router.post("/chat/completions", summary="OpenAI-compatible chat completion (answer paths as models)",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"},
                        404: {"description": "Unknown model."}})
async def chat_completions(body: ChatCompletionRequest, service: ServiceDep, request: Request):
    collection = authorize(request, body.collection, Role.READ)
    if body.model not in MODELS:
        raise ApiError(404, "model_not_found", f"Unknown model '{body.model[:100]}'. Available: "
                       f"{', '.join(_available(service))}.")
    question = next((m.text() for m in reversed(body.messages) if m.role == "user"), "")
    history = conversation_turns(body.messages)
    if not question.strip():
        raise ApiError(422, VALIDATION_ERROR, "messages: needs a user message with text (the question).")
    if len(question) > MAX_QUESTION_CHARS:
        raise ApiError(422, VALIDATION_ERROR,
                       f"messages: the question (last user message) is over {MAX_QUESTION_CHARS} characters.")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = generation_params(service, body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_NEW_TOKENS,
                               body.temperature or 0.0, body.top_k, body.top_p, body.seed, stop)
    answer_request = AnswerRequest(question, MODELS[body.model], body.k, body.retriever, body.source, params,
                                   history=history, collection=collection)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def usage_of(result) -> dict:
        prompt, completion = result.usage.get("prompt_tokens", 0), result.usage.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def extras(result) -> dict:
        """The fields an OpenAI reply does not have: what the answer cites and quotes, and whether it checks out."""
        data = result.to_dict()
        return {name: data[name] for name in ("citations", "evidence", "supported")}

    if not body.stream:
        result = await answer(service, answer_request, request)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": usage_of(result), **extras(result)}

    stream = await open_stream(service, answer_request, request)
    request_id = current_request_id(request.scope)

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return sse(None, {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                          "model": body.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                            "logprobs": None}], **extra})

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for item in stream.pieces():
                if isinstance(item, str):
                    yield chunk({"content": item})
                else:
                    yield chunk({}, item.finish_reason, usage=usage_of(item), **extras(item))
        except Exception as error:
            logger.error("stream failed", extra={"error": f"{type(error).__name__}: {error}"})
            yield sse(None, {"error": {"type": "server_error", "code": "generation_failed",
                                       "message": "Generation failed.", "request_id": request_id}})
        yield sse(None, "[DONE]")

    return EventStreamResponse(events(), on_close=stream.close)
