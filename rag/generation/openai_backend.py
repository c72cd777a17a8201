"""A decoder behind an OpenAI-compatible chat-completions server (vLLM, TGI, llama.cpp's server, this service's
own /v1), with the same parameters, token counts and streaming contract as the local backend.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator as PyGenerator
from pathlib import Path
from typing import Any

from rag.decoder_cache import cached_decoder
from rag.errors import UserError
from rag.generation.base import (
    DEFAULT_CONTEXT_WINDOW,
    OPENAI_TOP_LOGPROBS,
    Generation,
    GenerationParams,
    GenerationStream,
    GeneratorUnavailable,
    check_options,
)
from rag.models import load_tokenizer


class OpenAIGenerator:
    """A decoder behind an OpenAI-compatible chat-completions server: vLLM, TGI, llama.cpp's server, or this
    service's own /v1 route. Used to put a bigger model on GPUs while the pipeline runs anywhere.

    Prompts are budgeted with a *local* tokenizer (`tokenizer_path`: a folder or .gguf holding the served model's
    tokenizer and chat template; default: the packaged SmolLM2 tokenizer). Point it at your served model's
    tokenizer, or token budgets are only estimates. `context_window`, when not given, is the served model's
    `max_model_len` from /v1/models (vLLM reports it: prompts then fit `--max-model-len` instead of being refused),
    else 8192 tokens. top_k is not in OpenAI's API: it travels in the request body, where vLLM, TGI and llama.cpp
    read it.
    """

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", timeout: float = 120.0,
                 max_retries: int = 2, tokenizer_path: str | Path | None = None, context_window: int | None = None,
                 cache_dir: Path | None = None):
        from openai import OpenAI

        self.base_url = base_url
        self.model_name = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=max_retries)
        # A .gguf's tokenizer reads faster from its dequantised copy, when one was made (never made just for this).
        self.tokenizer = load_tokenizer(cached_decoder(tokenizer_path, cache_dir, create=False))
        self._context_window = int(context_window) if context_window else None

    @property
    def context_window(self) -> int:
        """Asked of the server once, on first use (a server that is down when the service starts is asked again
        when it is next needed)."""
        if self._context_window is None:
            self._context_window = self._served_context_window() or DEFAULT_CONTEXT_WINDOW
        return self._context_window

    # -- public API
    def generate(self, messages: list[dict], params: GenerationParams) -> Generation:
        started = time.perf_counter()
        response = self._call(self._request(messages, params))
        seconds = time.perf_counter() - started
        if not response.choices:
            raise GeneratorUnavailable(f"Decoder server at {self.base_url} answered without any choice.")
        choice = response.choices[0]
        text = choice.message.content or ""
        return self._generation(messages, text, response.usage, choice.finish_reason, seconds)

    def stream(self, messages: list[dict], params: GenerationParams) -> GenerationStream:
        """Server-sent chunks as text pieces; `.generation` holds the server's token counts afterwards."""
        return GenerationStream(self._stream(messages, params))

    def option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]:
        """Log-probability of each option's first token as the reply's first token, from one request with
        max_tokens=1 and the server's top 20 log-probabilities.

        Unlike the local backend this scores only the first token (enough for Yes/No/Maybe, which are one token
        each); options whose first tokens coincide cannot be told apart and are refused. An option whose first
        token is not among the top 20 gets the 20th's log-probability, an upper bound. Raises
        NotImplementedError when the server returns no log-probabilities.
        """
        check_options(options)
        firsts = {option: self.tokenizer.decode(self.tokenizer.encode(option, add_special_tokens=False)[:1])
                  for option in options}
        by_token: dict[str, str] = {}
        for option, first in firsts.items():
            if by_token.setdefault(first, option) != option:
                raise UserError(f"options '{by_token[first]}' and '{option}' begin with the same token '{first}': "
                                 "the openai backend scores first tokens only; use the transformers backend")
        request = self._request(messages, GenerationParams(max_new_tokens=1), logprobs=True,
                                top_logprobs=OPENAI_TOP_LOGPROBS)
        try:
            response = self._call(request)
        except UserError as error:
            raise NotImplementedError(f"Decoder server at {self.base_url} refused a logprobs request, so options "
                                      f"cannot be scored through it: {error}") from error
        candidates = _top_logprobs(response)
        if not candidates:
            raise NotImplementedError(
                f"Decoder server at {self.base_url} returned no logprobs, so closed-set options cannot be scored "
                "through it. Use a server that returns them (vLLM does) or the transformers backend.")
        floor = min(candidates.values())
        scores = {}
        for option in options:
            if firsts[option] in candidates:
                scores[option] = candidates[firsts[option]]
            else:  # the server's tokenizer splits differently: the longest candidate that begins the option
                prefixes = [token for token in candidates if token and option.startswith(token)]
                scores[option] = candidates[max(prefixes, key=len)] if prefixes else floor
        return scores

    # -- internals
    def _served_context_window(self) -> int | None:
        """`max_model_len` of the served model (a LoRA adapter's is its base model's, vLLM lists it as `parent`);
        None when the server does not say (no /v1/models, or no such field: TGI, llama.cpp, older servers)."""
        import openai

        with self._server_errors():  # unreachable: GeneratorUnavailable, as the request itself would raise
            try:
                models = {model.id: model for model in self.client.models.list()}
            except openai.APIStatusError:  # it answered, but lists no models: the request will say what is wrong
                return None
        model = models.get(self.model_name)
        length = getattr(model, "max_model_len", None)
        if length is None and model is not None:
            length = getattr(models.get(getattr(model, "parent", None) or ""), "max_model_len", None)
        return int(length) if isinstance(length, int) and length > 0 else None

    def _request(self, messages: list[dict], params: GenerationParams, **extra: Any) -> dict:
        """Every parameter that was set reaches the server; top_k in the body (not an OpenAI parameter)."""
        request: dict[str, Any] = dict(model=self.model_name, messages=messages, max_tokens=params.max_new_tokens,
                                       temperature=params.temperature, **extra)
        if params.top_p is not None:
            request["top_p"] = params.top_p
        if params.seed is not None:
            request["seed"] = params.seed
        if params.stop:
            request["stop"] = list(params.stop)
        if params.top_k is not None:
            request["extra_body"] = {"top_k": params.top_k}
        return request

    def _call(self, request: dict) -> Any:
        with self._server_errors():
            return self.client.chat.completions.create(**request)

    def _stream(self, messages: list[dict], params: GenerationParams) -> PyGenerator[str, None, Generation]:
        started = time.perf_counter()
        response = self._call(self._request(messages, params, stream=True, stream_options={"include_usage": True}))
        pieces: list[str] = []
        usage, finish = None, None
        try:
            with self._server_errors():
                for chunk in response:
                    usage = getattr(chunk, "usage", None) or usage
                    for choice in chunk.choices[:1]:
                        finish = choice.finish_reason or finish
                        if choice.delta and choice.delta.content:
                            pieces.append(choice.delta.content)
                            yield choice.delta.content
        finally:
            response.close()
        return self._generation(messages, "".join(pieces), usage, finish, time.perf_counter() - started)

    def _generation(self, messages: list[dict], text: str, usage: Any, finish: str | None,
                    seconds: float) -> Generation:
        """Token counts from the server's usage; counted with the local tokenizer when a server sends none."""
        if usage is not None and usage.prompt_tokens is not None:
            tokens_in, tokens_out = int(usage.prompt_tokens), int(usage.completion_tokens or 0)
        else:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
            tokens_in = len(encoded["input_ids"])
            tokens_out = len(self.tokenizer.encode(text, add_special_tokens=False))
        return Generation(text, tokens_in, tokens_out, seconds, finish or "stop")

    def _server_errors(self) -> Any:
        return _map_server_errors(self.base_url, self.model_name)


class _map_server_errors:
    """The openai client's exceptions as this library's: unreachable or refusing server → GeneratorUnavailable
    (a 503 in the API), a request the server calls invalid → UserError (a 422), each naming the server."""

    def __init__(self, base_url: str, model: str):
        self.base_url, self.model = base_url, model

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> bool:
        if error is None:
            return False
        import httpx
        import openai

        where = f"Decoder server at {self.base_url}"
        if isinstance(error, openai.APIConnectionError):  # includes timeouts
            raise GeneratorUnavailable(f"{where} is unreachable ({type(error).__name__}: {error}). Start it, or "
                                       "set RAG_OPENAI_BASE_URL to a running OpenAI-compatible server.") from error
        if isinstance(error, openai.APIStatusError):
            status, message = error.status_code, str(error.message)[:300]
            if status in (400, 413, 422):
                raise UserError(f"{where} refused the request ({status}): {message}") from error
            if status in (401, 403):
                raise GeneratorUnavailable(f"{where} rejected the API key ({status}); set RAG_OPENAI_API_KEY.") \
                    from error
            if status == 404:
                raise GeneratorUnavailable(
                    f"{where} answered 404 for model '{self.model}': {message}. Set RAG_OPENAI_MODEL to a served "
                    "model, and check that the URL ends in /v1.") from error
            raise GeneratorUnavailable(f"{where} answered {status}: {message}") from error
        if isinstance(error, (openai.APIError, httpx.HTTPError)):
            raise GeneratorUnavailable(f"{where} failed mid-response ({type(error).__name__}: {error}).") from error
        return False


def _top_logprobs(response: Any) -> dict[str, float]:
    """token → log-probability of the reply's first position, from a chat completion with top_logprobs."""
    choice = response.choices[0] if response.choices else None
    content = choice.logprobs.content if choice is not None and choice.logprobs else None
    if not content or not content[0].top_logprobs:
        return {}
    candidates: dict[str, float] = {}
    for item in content[0].top_logprobs:
        candidates[item.token] = max(item.logprob, candidates.get(item.token, -math.inf))
    return candidates
