"""A minimal OpenAI-compatible chat-completions server over a real `TransformersGenerator`, for tests only.

It lets `OpenAIGenerator` be tested against real HTTP (uvicorn on 127.0.0.1, SSE streaming) and a real model
instead of canned replies. It keeps every request body in `app.state.requests` so tests can see what arrived.
Log-probabilities are reported for the first reply position only (enough for option scoring).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from rag.generation import Generation, GenerationParams, TransformersGenerator


def create_app(generator: TransformersGenerator) -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/chat/completions")
    def chat_completions(body: Annotated[dict, Body()]):  # sync: FastAPI runs it on a worker thread
        app.state.requests.append(body)
        try:
            params = _params(body)
        except ValueError as error:
            return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error"}}, 400)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(generator, body["messages"], params, reply, usage),
                                     media_type="text/event-stream")
        generation = generator.generate(body["messages"], params)
        logprobs = _logprobs(generator, body) if body.get("logprobs") else None
        return {**reply, "object": "chat.completion", "usage": _usage(generation),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                             "finish_reason": generation.finish_reason, "logprobs": logprobs}]}

    return app


def _params(body: dict) -> GenerationParams:
    limits = [body.get(key) for key in ("max_completion_tokens", "max_tokens") if body.get(key) is not None]
    return GenerationParams(max_new_tokens=limits[0] if limits else 16,
                            temperature=body.get("temperature", 1.0), top_k=body.get("top_k"),
                            top_p=body.get("top_p"), seed=body.get("seed"), stop=body.get("stop") or [])


def _usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.tokens_in, "completion_tokens": generation.tokens_out,
            "total_tokens": generation.tokens_in + generation.tokens_out}


def _logprobs(generator: TransformersGenerator, body: dict) -> dict:
    top = generator.top_next_tokens(body["messages"], body.get("top_logprobs") or 1)
    entries = [{"token": token, "logprob": logprob, "bytes": list(token.encode())} for token, logprob in top]
    return {"content": [{**entries[0], "top_logprobs": entries}]}


def _events(generator: TransformersGenerator, messages: list[dict], params: GenerationParams, reply: dict,
            include_usage: bool) -> Iterator[str]:
    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**reply, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    with generator.stream(messages, params) as stream:
        for piece in stream:
            yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": stream.generation.finish_reason}])
    if include_usage:
        yield chunk([], usage=_usage(stream.generation))
    yield "data: [DONE]\n\n"


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Runs the app with uvicorn on a free loopback port in a thread; yields the OpenAI base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test OpenAI server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
