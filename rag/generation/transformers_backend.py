"""The decoder run in this process with `transformers`: a local HF folder, a .gguf file, or the packaged
SmolLM2-135M-Instruct. Streaming runs `model.generate` in a worker thread and hands out the stable part of the
growing reply, so `stream()` joined equals `generate().text` at temperature 0.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Generator as PyGenerator
from pathlib import Path
from typing import Any

from rag.decoder_cache import cached_decoder, merged_copy
from rag.errors import UserError
from rag.generation.adapters import apply_adapter, checked_adapter
from rag.generation.base import (
    DEFAULT_CONTEXT_WINDOW,
    OPENAI_TOP_LOGPROBS,
    Generation,
    GenerationParams,
    GenerationStream,
    check_int,
    check_options,
    cut_at_stop,
)
from rag.models import load_causal_lm, model_imports, resolve_decoder

logger = logging.getLogger("rag.generation")


class _TextWatch:
    """Called by `model.generate` after every new token (as a StoppingCriteria): decodes the reply so far, hands it
    to a stream, and stops on a stop string or when the stream was closed. Decoding the whole reply each step
    costs microseconds next to a forward pass and sees stop strings that span tokens."""

    def __init__(self, tokenizer: Any, prompt_length: int, stop: list[str], cancel: threading.Event | None,
                 on_text: Callable[[str], None] | None):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop
        self.cancel, self.on_text = cancel, on_text

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self.cancel is not None and self.cancel.is_set()
        if self.stop or self.on_text:
            text = self.tokenizer.decode(input_ids[0, self.prompt_length:], skip_special_tokens=True)
            if self.on_text:
                self.on_text(text)
            done = done or any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _stopping_criteria(watch: _TextWatch) -> Any:
    with model_imports():
        from transformers import StoppingCriteria, StoppingCriteriaList

    class TextWatchCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return watch(input_ids, scores, **kwargs)

    return StoppingCriteriaList([TextWatchCriteria()])


class TransformersGenerator:
    """A decoder run in this process with transformers: a local HF folder, a .gguf file (dequantised on load), or
    the packaged SmolLM2-135M-Instruct. cuda in bf16 when present, else cpu in fp32. The model's name is the one
configured (the .gguf's file name), whatever folder a cached copy was loaded from.

    One generation runs at a time per model (a lock): torch already uses every core for one sequence, and the
    fast tokenizer is not safe to share between threads.

    >>> generator = TransformersGenerator()  # doctest: +SKIP
    >>> hello = [{"role": "user", "content": "Say hi"}]  # doctest: +SKIP
    >>> generator.generate(hello, GenerationParams(max_new_tokens=8)).text  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, device: str = "auto", adapter_dir: str | Path | None = None,
                 context_window: int | None = None, cache_dir: Path | None = None):
        folder, gguf_file = resolve_decoder(model)  # ModelNotFoundError before any slow import or load
        adapter = checked_adapter(adapter_dir, model)  # refused before spending seconds on loading
        # With caching on (`cache_dir`), a .gguf loads from its dequantised copy and a decoder with an adapter from
        # its merged copy, each made on first use.
        source = cached_decoder(model, cache_dir)
        name = gguf_file or folder.name
        if adapter is not None and cache_dir is not None and source is not None and Path(source).is_dir():
            source, name, adapter = merged_copy(Path(source), adapter, cache_dir), f"{name}+{adapter.name}", None
        loaded, tokenizer, resolved = load_causal_lm(source, device)
        self._setup(loaded, tokenizer, resolved, name, adapter, context_window)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, device: str, name: str, adapter_dir: str | Path | None = None,
                    base: str | Path | None = None, context_window: int | None = None) -> TransformersGenerator:
        """Wraps a model already in memory (say, right after `rag finetune`) instead of loading it again: GGUF
        loading costs seconds. `base` is what the model was loaded from (None: the packaged decoder); an adapter
        is checked against it. The model is used as given, so pass a copy if the caller keeps using it."""
        generator = cls.__new__(cls)
        generator._setup(model, tokenizer, device, name, checked_adapter(adapter_dir, base), context_window)
        return generator

    def _setup(self, model: Any, tokenizer: Any, device: str, name: str, adapter_dir: Path | None,
               context_window: int | None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"Decoder '{name}' has no chat template; use an instruct/chat model.")
        self.model, self.tokenizer, self.device, self.model_name = model, tokenizer, device, name
        if adapter_dir is not None:
            self.model = apply_adapter(self.model, adapter_dir)
            self.model_name += f"+{adapter_dir.name}"
        configured = getattr(self.model.config, "max_position_embeddings", None)
        self.context_window = int(context_window or configured or DEFAULT_CONTEXT_WINDOW)
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._eos_ids.add(self.tokenizer.eos_token_id)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._lock = threading.Lock()

    # -- public API
    def generate(self, messages: list[dict], params: GenerationParams) -> Generation:
        """The whole reply at once."""
        return self._run(messages, params)

    def stream(self, messages: list[dict], params: GenerationParams) -> GenerationStream:
        """Text pieces as they are generated; joined, they equal `generate(...).text` at temperature 0 (the same
        `model.generate` call runs underneath). Text that might begin a stop sequence is held back until it
        cannot. `.generation` holds the counts once the stream is exhausted."""
        return GenerationStream(self._stream(messages, params))

    def option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]:
        """Log-likelihood of each option as the assistant's whole reply, summed over its tokens.

        Options are scored exactly as written, right after the assistant header: "Yes", not " yes" (a leading
        space is another token and, for SmolLM2, forces one answer everywhere: see docs/environment.md). One forward
        pass over the prompt scores every one-token option (Yes/No/Maybe); a longer option costs one more pass.
        """
        import torch

        check_options(options)
        scores: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            prompt = self._encode(messages)["input_ids"][0].tolist()
            encoded = {option: self._option_ids(option) for option in options}
            self._check_room(len(prompt), max(len(ids) for ids in encoded.values()))
            first = self._logprobs(prompt, 1)[0]
            for option, ids in encoded.items():
                if len(ids) == 1:
                    scores[option] = float(first[ids[0]])
                else:  # positions from the prompt's last token to the option's second-to-last predict the option
                    logprobs = self._logprobs(prompt + ids[:-1], len(ids))
                    scores[option] = float(logprobs.gather(1, torch.tensor(ids, device=self.device)[:, None]).sum())
        return scores

    def top_next_tokens(self, messages: list[dict], k: int = OPENAI_TOP_LOGPROBS) -> list[tuple[str, float]]:
        """The k likeliest first tokens of the reply with their log-probabilities, as OpenAI's `top_logprobs`
        reports them (an OpenAI-compatible server over this backend uses it)."""
        import torch

        check_int("k", k, 1, 1000)
        with self._lock, torch.inference_mode():
            best = self._logprobs(self._encode(messages)["input_ids"][0].tolist(), 1)[0].topk(k)
            pairs = zip(best.values.tolist(), best.indices.tolist(), strict=True)
            return [(self.tokenizer.decode([index]), value) for value, index in pairs]

    # -- internals
    def _logprobs(self, ids: list[int], last: int) -> Any:
        """Next-token log-probabilities (fp32) at the last `last` positions of one sequence, shape (last, vocab).
        Only those positions' logits are computed when the model supports it (a 49k vocabulary × a long prompt
        is hundreds of MB otherwise)."""
        import torch

        keep = {"logits_to_keep": last} if self._keeps_logits else {}
        logits = self.model(input_ids=torch.tensor([ids], device=self.device), **keep).logits[0, -last:]
        return torch.log_softmax(logits.float(), dim=-1)

    def _option_ids(self, option: str) -> list[int]:
        return self.tokenizer.encode(option, add_special_tokens=False)

    def _encode(self, messages: list[dict]) -> dict:
        if not messages:
            raise UserError("messages is empty; give at least one {'role': ..., 'content': ...} turn")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"].to(self.device),
                "attention_mask": encoded["attention_mask"].to(self.device)}

    def _check_room(self, tokens_in: int, tokens_out: int) -> None:
        if tokens_in + tokens_out > self.context_window:
            raise UserError(
                f"The prompt is {tokens_in} tokens and up to {tokens_out} may be generated: more than the "
                f"decoder's context window of {self.context_window} tokens. Shorten the prompt or lower "
                "max_new_tokens.")

    def _generate_kwargs(self, inputs: dict, params: GenerationParams, watch: _TextWatch | None) -> dict:
        """Exactly our parameters, nothing inherited: with sampling, top_k/top_p of None are passed as 'off'
        (transformers would otherwise apply top_k=50); greedy clears any sampling defaults of the model."""
        kwargs: dict[str, Any] = dict(**inputs, max_new_tokens=params.max_new_tokens, do_sample=params.sampling,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if params.sampling:
            kwargs.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if watch is not None:
            kwargs["stopping_criteria"] = _stopping_criteria(watch)
        return kwargs

    def _run(self, messages: list[dict], params: GenerationParams, on_text: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None) -> Generation:
        """One `model.generate` call; `generate()` and `stream()` both come here, so their texts agree."""
        import torch

        with self._lock, torch.inference_mode():
            inputs = self._encode(messages)
            tokens_in = int(inputs["input_ids"].shape[1])
            self._check_room(tokens_in, params.max_new_tokens)
            watch = _TextWatch(self.tokenizer, tokens_in, params.stop, cancel, on_text) \
                if params.stop or on_text or cancel else None
            if params.sampling and params.seed is not None:
                torch.manual_seed(params.seed)  # under the lock: the global RNG is ours for this call
            started = time.perf_counter()
            output = self.model.generate(**self._generate_kwargs(inputs, params, watch))
            seconds = time.perf_counter() - started
            new_tokens = output[0, tokens_in:].tolist()
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        if stopped or (new_tokens and new_tokens[-1] in self._eos_ids):
            finish = "stop"
        elif len(new_tokens) >= params.max_new_tokens:
            finish = "length"
        else:
            finish = "cancelled" if cancel is not None and cancel.is_set() else "stop"
        if finish != "stop":  # cut inside a character: drop its undecodable first bytes
            text = text.rstrip("\ufffd")
        return Generation(text, tokens_in, len(new_tokens), seconds, finish)

    def _stream(self, messages: list[dict], params: GenerationParams) -> PyGenerator[str, None, Generation]:
        """Runs `_run` in a worker thread and yields the stable part of the growing reply. Closing the stream
        sets `cancel`, which the stopping criterion sees at the next token."""
        updates: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        cancel = threading.Event()

        def work() -> None:
            try:
                updates.put(("done", self._run(messages, params, lambda t: updates.put(("text", t)), cancel)))
            except BaseException as error:  # noqa: BLE001 (re-raised in the consuming thread)
                updates.put(("error", error))

        worker = threading.Thread(target=work, name="decoder-stream", daemon=True)
        worker.start()
        emitted = ""
        try:
            while True:
                kind, value = updates.get()
                while kind == "text":  # skip to the newest text if the reader fell behind
                    try:
                        kind, value = updates.get_nowait()
                    except queue.Empty:
                        break
                if kind == "error":
                    raise value
                if kind == "done":
                    if not value.text.startswith(emitted):  # not expected for prefix-stable tokenizers
                        logger.warning("streamed text diverged from the final decode; the stream may differ")
                    if value.text[len(emitted):]:
                        yield value.text[len(emitted):]
                    return value
                stable = _stable_prefix(value, params.stop)
                if len(stable) > len(emitted) and stable.startswith(emitted):
                    yield stable[len(emitted):]
                    emitted = stable
        finally:
            cancel.set()
            worker.join()


def _stable_prefix(text: str, stop: list[str]) -> str:
    """The part of a partial reply that later tokens cannot change: before any stop string, without a trailing
    half-decoded character (U+FFFD while its UTF-8 bytes are incomplete) and without an ending that could still
    grow into a stop string."""
    text, stopped = cut_at_stop(text, stop)
    text = text.rstrip("\ufffd")
    if not stopped:
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - hold]
    return text
