"""Decoder backends: local `transformers` (CPU, or CUDA where present) and any OpenAI-compatible server.

Both speak chat messages and take the same `GenerationParams`; both can stream. The local backend also scores
closed-set answers by likelihood (`option_logprobs`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from rag.config import Settings
from rag.models import ModelNotFoundError, decoder_identity, existing_path, load_causal_lm, resolve_decoder

DEFAULT_CONTEXT_WINDOW = 8192


class NoAdapterConfigured(RuntimeError):
    """A fine-tuned path was asked for without an adapter."""


class GeneratorUnavailable(RuntimeError):
    """The decoder server cannot be reached or refused the request."""


class AdapterMismatchError(RuntimeError):
    """An adapter was trained on another base model."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Inference parameters, the same on every path and interface. temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 32768:
            raise ValueError(f"max_new_tokens must be between 1 and 32768, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 8 or any(not s for s in self.stop):
            raise ValueError("stop takes at most 8 non-empty sequences")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    tokens_in: int
    tokens_out: int
    seconds: float
    finish_reason: str = "stop"  # 'stop' (end of turn or a stop sequence) or 'length'

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_out / self.seconds if self.seconds else 0.0


class Generator(Protocol):
    tokenizer: object  # a HF tokenizer with the decoder's chat template: prompts are budgeted with it
    context_window: int
    model_name: str

    def generate(self, messages: list[dict], params: GenerationParams) -> Generation: ...

    def stream(self, messages: list[dict], params: GenerationParams) -> Iterator[str]: ...

    def option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]: ...


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s in text]
    return (text[: min(positions)], True) if positions else (text, False)


class TransformersGenerator:
    """A decoder run in-process with transformers: a local HF folder, a .gguf file, or the packaged SmolLM2-135M.

    >>> generator = TransformersGenerator()  # doctest: +SKIP
    >>> generator.generate([{"role": "user", "content": "Say hi"}], GenerationParams(max_new_tokens=8)).text  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, device: str = "auto", adapter_dir: str | Path | None = None,
                 context_window: int | None = None):
        self.model, self.tokenizer, self.device = load_causal_lm(model, device)
        folder, gguf_file = resolve_decoder(model)
        self.model_name = gguf_file or folder.name
        if adapter_dir is not None:
            self.model = _apply_adapter(self.model, Path(adapter_dir), model)
            self.model_name += f"+{Path(adapter_dir).name}"
        self.context_window = context_window or getattr(self.model.config, "max_position_embeddings",
                                                        DEFAULT_CONTEXT_WINDOW)
        self._lock = threading.Lock()  # one generation at a time per model: torch already uses every core

    def _encode(self, messages: list[dict]):
        import torch

        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
        return {key: value.to(self.device) for key, value in encoded.items() if isinstance(value, torch.Tensor)}

    def _generate_kwargs(self, inputs: dict, params: GenerationParams) -> dict:
        kwargs = dict(**inputs, max_new_tokens=params.max_new_tokens, do_sample=params.sampling,
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if params.sampling:
            kwargs.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0)
        else:  # the model's generation_config may carry sampling defaults; greedy must ignore them
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        return kwargs

    def generate(self, messages: list[dict], params: GenerationParams) -> Generation:
        import torch

        inputs = self._encode(messages)
        prompt_length = inputs["input_ids"].shape[1]
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            started = time.perf_counter()
            output = self.model.generate(**self._generate_kwargs(inputs, params))
            seconds = time.perf_counter() - started
        new_tokens = output[0, prompt_length:]
        text, stopped = _cut_at_stop(self.tokenizer.decode(new_tokens, skip_special_tokens=True), params.stop)
        ended = stopped or (len(new_tokens) and new_tokens[-1].item() == self.tokenizer.eos_token_id)
        finish = "stop" if ended or len(new_tokens) < params.max_new_tokens else "length"
        return Generation(text, prompt_length, int(len(new_tokens)), seconds, finish)

    def stream(self, messages: list[dict], params: GenerationParams) -> Iterator[str]:
        """Text pieces as they are generated; joined, they equal `generate(...).text` at temperature 0."""
        import torch
        from transformers import TextIteratorStreamer

        inputs = self._encode(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    self.model.generate(**self._generate_kwargs(inputs, params), streamer=streamer)
            except BaseException as error:  # surfaced in the consuming thread below
                failure.append(error)
                streamer.end()

        with self._lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            emitted = ""
            # Hold back text that could be the start of a stop sequence, so a stop string is never emitted.
            hold = max((len(s) for s in params.stop), default=0)
            buffer = ""
            for piece in streamer:
                buffer += piece
                text, stopped = _cut_at_stop(buffer, params.stop)
                if stopped:
                    if text[len(emitted):]:
                        yield text[len(emitted):]
                    emitted = text
                    break
                safe = len(buffer) - hold if hold else len(buffer)
                if safe > len(emitted):
                    yield buffer[len(emitted):safe]
                    emitted = buffer[:safe]
            else:
                if buffer[len(emitted):]:
                    yield buffer[len(emitted):]
            worker.join()
        if failure:
            raise failure[0]

    def option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]:
        """Log-likelihood of each option as the whole assistant reply (summed over its tokens)."""
        import torch

        inputs = self._encode(messages)
        prompt_ids = inputs["input_ids"]
        scores = {}
        with self._lock, torch.inference_mode():
            for option in options:
                option_ids = torch.tensor([self.tokenizer.encode(option, add_special_tokens=False)], device=self.device)
                ids = torch.cat([prompt_ids, option_ids], dim=1)
                logits = self.model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1:-1]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                scores[option] = float(logprobs.gather(1, option_ids[0].unsqueeze(1)).sum())
        return scores


def _apply_adapter(model, adapter_dir: Path, base: str | Path | None):
    from peft import PeftModel

    from rag.evaluate import TRAINING_RECORD

    adapter_dir = existing_path(adapter_dir, "Adapter folder")
    record_path = adapter_dir / TRAINING_RECORD
    if record_path.exists():
        import json

        trained_on = json.loads(record_path.read_text()).get("base_model", {})
        current = decoder_identity(base)
        if trained_on.get("sha256") and trained_on["sha256"] != current["sha256"]:
            raise AdapterMismatchError(
                f"Adapter '{adapter_dir}' was trained on base model '{trained_on.get('name')}' "
                f"(sha256 {trained_on['sha256'][:12]}…), but the configured decoder is '{current['name']}' "
                f"(sha256 {current['sha256'][:12]}…). Configure that base model or train a new adapter."
            )
    if (adapter_dir / "adapter_config.json").exists():
        return PeftModel.from_pretrained(model, adapter_dir).eval()
    raise ModelNotFoundError(f"'{adapter_dir}' holds no adapter_config.json: not a LoRA adapter folder.")


class OpenAIGenerator:
    """A decoder behind an OpenAI-compatible chat-completions server (vLLM, TGI, llama.cpp server, or our API).

    Prompts are budgeted with a local copy of the served model's tokenizer (`tokenizer_path`; default: the packaged
    SmolLM2 tokenizer); point it at your served model's tokenizer folder so the budget is exact.
    """

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", timeout: float = 120.0,
                 max_retries: int = 2, tokenizer_path: str | Path | None = None, context_window: int | None = None):
        from openai import OpenAI
        from transformers import AutoTokenizer

        self.base_url = base_url
        self.model_name = model
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        folder, gguf_file = resolve_decoder(tokenizer_path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                       **({"gguf_file": gguf_file} if gguf_file else {}))
        self.context_window = context_window or DEFAULT_CONTEXT_WINDOW

    def _request(self, messages: list[dict], params: GenerationParams, **extra) -> dict:
        request = dict(model=self.model_name, messages=messages, max_tokens=params.max_new_tokens,
                       temperature=params.temperature, **extra)
        if params.top_p is not None:
            request["top_p"] = params.top_p
        if params.seed is not None:
            request["seed"] = params.seed
        if params.stop:
            request["stop"] = params.stop
        if params.top_k is not None:
            request["extra_body"] = {"top_k": params.top_k}  # not in OpenAI's API; vLLM, TGI and llama.cpp read it
        return request

    def _call(self, **request):
        import openai

        try:
            return self.client.chat.completions.create(**request)
        except openai.APIConnectionError as error:
            raise GeneratorUnavailable(f"Decoder server at {self.base_url} is unreachable: {error}") from error
        except openai.APIStatusError as error:
            raise GeneratorUnavailable(
                f"Decoder server at {self.base_url} answered {error.status_code}: {error.message}") from error

    def generate(self, messages: list[dict], params: GenerationParams) -> Generation:
        started = time.perf_counter()
        response = self._call(**self._request(messages, params))
        seconds = time.perf_counter() - started
        choice = response.choices[0]
        text = choice.message.content or ""
        usage = response.usage
        tokens_in = usage.prompt_tokens if usage else len(self.tokenizer.apply_chat_template(messages, tokenize=True))
        tokens_out = usage.completion_tokens if usage else len(self.tokenizer.encode(text, add_special_tokens=False))
        return Generation(text, tokens_in, tokens_out, seconds, choice.finish_reason or "stop")

    def stream(self, messages: list[dict], params: GenerationParams) -> Iterator[str]:
        for chunk in self._call(**self._request(messages, params, stream=True)):
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]:
        """Scores options by the first token's log-probability among the server's top candidates."""
        response = self._call(**self._request(messages, GenerationParams(max_new_tokens=1), logprobs=True,
                                              top_logprobs=20))
        content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
        if not content:
            raise GeneratorUnavailable(f"Decoder server at {self.base_url} returned no logprobs; "
                                       "closed-set scoring needs a server that supports them (vLLM does).")
        candidates = {item.token: item.logprob for item in content[0].top_logprobs}
        floor = min(candidates.values()) - 1.0
        return {option: max((lp for token, lp in candidates.items() if token.strip() and option.startswith(
            token.strip())), default=floor) for option in options}


@lru_cache(maxsize=4)
def _cached_transformers(model: str | None, device: str, adapter: str | None, context_window: int | None):
    return TransformersGenerator(model, device, adapter, context_window)


def load_generator(settings: Settings, adapter_dir: Path | None = None) -> Generator:
    """The configured decoder, loaded once per process (per model, device and adapter)."""
    if settings.backend == "openai":
        if adapter_dir is not None:
            # A served model cannot take a local adapter; serve the merged model (`rag finetune --merge`) instead.
            return OpenAIGenerator(settings.openai_base_url, f"{settings.openai_model}-finetuned",
                                   settings.openai_api_key, settings.openai_timeout, settings.openai_max_retries,
                                   settings.decoder_model, settings.context_window)
        return OpenAIGenerator(settings.openai_base_url, settings.openai_model, settings.openai_api_key,
                               settings.openai_timeout, settings.openai_max_retries, settings.decoder_model,
                               settings.context_window)
    return _cached_transformers(settings.decoder_model, settings.device,
                                str(adapter_dir) if adapter_dir else None, settings.context_window)


def require_adapter(settings: Settings) -> Path:
    if settings.adapter_dir is None:
        raise NoAdapterConfigured(
            "no adapter configured: train one with `rag finetune` and set RAG_ADAPTER_DIR or --adapter")
    return settings.adapter_dir
