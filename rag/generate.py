"""The decoder seam: chat messages in, text out, from a local `transformers` model or an OpenAI-compatible server.

Both backends take the same `GenerationParams`, count tokens the same way, stream (`stream()` joined equals
`generate().text` at temperature 0), and score closed-set answers by likelihood (`option_logprobs`). Models load
once per process through `load_generator(settings)`; nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Generator as PyGenerator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rag.config import Settings
from rag.errors import ConflictError, UnavailableError, UserError
from rag.models import ModelNotFoundError, decoder_identity, existing_path, load_causal_lm, resolve_decoder

logger = logging.getLogger("rag.generate")

DEFAULT_CONTEXT_WINDOW = 8192  # when neither the settings nor the model say otherwise (SmolLM2's own value)
MAX_NEW_TOKENS = 32768
MAX_TEMPERATURE = 5.0
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 200
MAX_SEED = 2**63 - 1
OPENAI_TOP_LOGPROBS = 20  # the most OpenAI's API (and vLLM's default --max-logprobs) returns
ADAPTER_HINT = "train one with `rag finetune` and set RAG_ADAPTER_DIR or --adapter"


# ------------------------------------------------------------------------------------------------------- errors
class NoAdapterConfigured(UserError):
    """A fine-tuned path was asked for, but no adapter folder is configured."""


class GeneratorUnavailable(UnavailableError):
    """The decoder server cannot be reached, or it refused to serve (bad key, unknown model, overloaded)."""


class AdapterMismatchError(ConflictError):
    """An adapter was trained on a different base model than the configured decoder."""


# ------------------------------------------------------------------------------------------------- data types
@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Inference parameters, the same for every path, backend and interface.

    temperature 0 means greedy decoding (then top_k, top_p and seed are not used). top_k / top_p of None mean
    "no such filter" when sampling, as in OpenAI's API, not the library's own defaults. `stop` strings end the
    reply and are not part of it; a single string is accepted as a one-element list.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        elif isinstance(self.stop, (tuple, list)):
            object.__setattr__(self, "stop", list(self.stop))
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1, 1_000_000)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, 0.0, 1.0)
            if self.top_p == 0.0:
                raise ValueError("top_p must be greater than 0 and at most 1 (1 = no nucleus filter), got 0")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_stop(self.stop)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {value}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low:g} to {high:g}, got {value:g}")


def _check_stop(stop: object) -> None:
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a list of strings, got {stop!r}")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise ValueError(f"stop sequences must be non-empty and at most {MAX_STOP_CHARS} characters each")


@dataclass(frozen=True, slots=True)
class Generation:
    """One reply and what it cost. tokens_out counts every token the decoder produced (a stop sequence's tokens
    and the end-of-turn token included), as OpenAI-compatible servers report completion_tokens."""

    text: str
    tokens_in: int
    tokens_out: int
    seconds: float
    finish_reason: str = "stop"  # 'stop' (end of turn or a stop sequence), 'length', or 'cancelled'

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_out / self.seconds if self.seconds > 0 else 0.0


class GenerationStream(Iterator[str]):
    """Text pieces of one reply as they are produced; afterwards `generation` holds the whole `Generation`
    (exact token counts, finish reason). `close()` stops the decoder early (a client went away)."""

    def __init__(self, source: PyGenerator[str, None, Generation]):
        self._source = source
        self.generation: Generation | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._source)
        except StopIteration as done:
            if done.value is not None:
                self.generation = done.value
            raise StopIteration from None

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@runtime_checkable
class Generator(Protocol):
    """What the pipeline needs from a decoder."""

    tokenizer: Any  # HF tokenizer with the decoder's chat template: prompts are budgeted with it
    context_window: int
    model_name: str

    def generate(self, messages: list[dict], params: GenerationParams) -> Generation: ...

    def stream(self, messages: list[dict], params: GenerationParams) -> GenerationStream:
        """Text pieces (an Iterator[str]); usable as a context manager that stops generation on exit."""
        ...

    def option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]: ...


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop sequence, and whether one occurred."""
    positions = [index for index in (text.find(s) for s in stop) if index >= 0]
    return (text[: min(positions)], True) if positions else (text, False)


def _check_options(options: list[str]) -> None:
    if not options or any(not isinstance(o, str) or not o for o in options):
        raise ValueError(f"options must be a non-empty list of non-empty strings, got {options!r}")


# -------------------------------------------------------------------------------------- transformers backend
def resolve_device(device: str) -> str:
    """'auto' → cuda when torch sees a GPU, else cpu. An explicit device that is not there is an error, not a
    silent fallback, so a misconfigured GPU host does not quietly run 50× slower."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' was asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for, but it is not available; use 'auto' or 'cpu'")
        return device
    raise ValueError(f"unknown device '{device}'; allowed: auto, cpu, cuda, cuda:N, mps")


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
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TextWatchCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return watch(input_ids, scores, **kwargs)

    return StoppingCriteriaList([TextWatchCriteria()])


class TransformersGenerator:
    """A decoder run in this process with transformers: a local HF folder, a .gguf file (dequantised on load), or
    the packaged SmolLM2-135M-Instruct. cuda in bf16 when present, else cpu in fp32.

    One generation runs at a time per model (a lock): torch already uses every core for one sequence, and the
    fast tokenizer is not safe to share between threads.

    >>> generator = TransformersGenerator()  # doctest: +SKIP
    >>> hello = [{"role": "user", "content": "Say hi"}]  # doctest: +SKIP
    >>> generator.generate(hello, GenerationParams(max_new_tokens=8)).text  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, device: str = "auto", adapter_dir: str | Path | None = None,
                 context_window: int | None = None):
        folder, gguf_file = resolve_decoder(model)  # ModelNotFoundError before any slow import or load
        adapter = _checked_adapter(adapter_dir, model)  # refused before spending seconds on loading
        loaded, tokenizer, resolved = load_causal_lm(model, resolve_device(device))
        self._setup(loaded, tokenizer, resolved, gguf_file or folder.name, adapter, context_window)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, device: str, name: str, adapter_dir: str | Path | None = None,
                    base: str | Path | None = None, context_window: int | None = None) -> TransformersGenerator:
        """Wraps a model already in memory (say, right after `rag finetune`) instead of loading it again: GGUF
        loading costs seconds. `base` is what the model was loaded from (None: the packaged decoder); an adapter
        is checked against it. The model is used as given, so pass a copy if the caller keeps using it."""
        generator = cls.__new__(cls)
        generator._setup(model, tokenizer, device, name, _checked_adapter(adapter_dir, base), context_window)
        return generator

    def _setup(self, model: Any, tokenizer: Any, device: str, name: str, adapter_dir: Path | None,
               context_window: int | None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"Decoder '{name}' has no chat template; use an instruct/chat model.")
        self.model, self.tokenizer, self.device, self.model_name = model, tokenizer, device, name
        if adapter_dir is not None:
            self.model = _apply_adapter(self.model, adapter_dir)
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
        space is another token and, for SmolLM2, forces one answer everywhere: see ENVIRONMENT.md). One forward
        pass over the prompt scores every one-token option (Yes/No/Maybe); a longer option costs one more pass.
        """
        import torch

        _check_options(options)
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

        _check_int("k", k, 1, 1000)
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
            raise ValueError("messages is empty; give at least one {'role': ..., 'content': ...} turn")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"].to(self.device),
                "attention_mask": encoded["attention_mask"].to(self.device)}

    def _check_room(self, tokens_in: int, tokens_out: int) -> None:
        if tokens_in + tokens_out > self.context_window:
            raise ValueError(
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
        text, stopped = _cut_at_stop(text, params.stop)
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
    text, stopped = _cut_at_stop(text, stop)
    text = text.rstrip("\ufffd")
    if not stopped:
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - hold]
    return text


# ----------------------------------------------------------------------------------------------------- adapters
def base_model_identity(model: str | Path | None) -> dict:
    """What an adapter's recorded base model is compared with: the weights' name and sha256 (see
    `rag.models.decoder_identity`), plus the names the base may appear under in adapter_config.json."""
    folder, gguf_file = resolve_decoder(model)
    identity = decoder_identity(model)
    aliases = {folder.name, str(folder), str(folder.resolve())} | ({gguf_file} if gguf_file else set())
    identity["aliases"] = sorted(aliases)
    return identity


def check_adapter(adapter_dir: str | Path, base_identity: dict) -> None:
    """Refuse an adapter that was trained on another base model.

    The adapter folder must hold adapter_config.json. When `rag finetune` left a training record with the base
    weights' sha256, that decides; otherwise the name in adapter_config.json's `base_model_name_or_path` must
    match the configured decoder's file or folder name. Raises AdapterMismatchError or ModelNotFoundError.
    """
    from rag.evaluate import TRAINING_RECORD

    adapter_dir = existing_path(adapter_dir, "Adapter folder")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"'{adapter_dir}' holds no adapter_config.json, so it is not a LoRA adapter folder. (A full fine-tune "
            "is a model folder: set it as the decoder with RAG_DECODER_MODEL instead.)")
    record_path = adapter_dir / TRAINING_RECORD
    if record_path.is_file():
        trained_on = json.loads(record_path.read_text()).get("base_model") or {}
        if trained_on.get("sha256") and base_identity.get("sha256"):
            if trained_on["sha256"] != base_identity["sha256"]:
                raise AdapterMismatchError(
                    f"Adapter '{adapter_dir}' was trained on base model '{trained_on.get('name')}' (sha256 "
                    f"{trained_on['sha256'][:12]}…), but the configured decoder is '{base_identity.get('name')}' "
                    f"(sha256 {base_identity['sha256'][:12]}…). Configure that base model or train a new adapter.")
            return
    recorded = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not recorded:
        logger.warning("adapter %s does not name its base model; loading it onto %s unchecked", adapter_dir,
                       base_identity.get("name"))
        return
    names = {base_identity.get("name"), *base_identity.get("aliases", [])}
    if recorded not in names and Path(recorded).name not in names:
        raise AdapterMismatchError(
            f"Adapter '{adapter_dir}' was trained on base model '{recorded}', but the configured decoder is "
            f"'{base_identity.get('name')}'. Configure that base model (RAG_DECODER_MODEL) or train a new adapter.")


def _checked_adapter(adapter_dir: str | Path | None, base: str | Path | None) -> Path | None:
    if adapter_dir is None:
        return None
    adapter_dir = existing_path(adapter_dir, "Adapter folder")
    check_adapter(adapter_dir, base_model_identity(base))
    return adapter_dir


def _apply_adapter(model: Any, adapter_dir: Path) -> Any:
    """The base with the LoRA adapter merged in: merged weights decode as fast as the base model."""
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model, adapter_dir)
    merged = adapted.merge_and_unload() if hasattr(adapted, "merge_and_unload") else adapted
    return merged.eval()


def require_adapter(settings: Settings) -> Path:
    """The configured adapter folder, or a NoAdapterConfigured error that says how to get one."""
    if settings.adapter is None:
        raise NoAdapterConfigured(f"no adapter configured: {ADAPTER_HINT}")
    return settings.adapter


# --------------------------------------------------------------------------------------------- openai backend
@lru_cache(maxsize=8)
def _local_tokenizer(path: str | None) -> Any:
    """A tokenizer from a local folder or .gguf (default: the packaged SmolLM2's), loaded once per path."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder, gguf_file = resolve_decoder(path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)


class OpenAIGenerator:
    """A decoder behind an OpenAI-compatible chat-completions server: vLLM, TGI, llama.cpp's server, or this
    service's own /v1 route. Used to put a bigger model on GPUs while the pipeline runs anywhere.

    Prompts are budgeted with a *local* tokenizer (`tokenizer_path`: a folder or .gguf holding the served model's
    tokenizer and chat template; default: the packaged SmolLM2 tokenizer). Point it at your served model's
    tokenizer, or token budgets are only estimates. `context_window` defaults to 8192 tokens; set it to the
    server's limit (vLLM's --max-model-len). top_k is not in OpenAI's API: it travels in the request body, where
    vLLM, TGI and llama.cpp read it.
    """

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", timeout: float = 120.0,
                 max_retries: int = 2, tokenizer_path: str | Path | None = None, context_window: int | None = None):
        from openai import OpenAI

        self.base_url = base_url
        self.model_name = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=max_retries)
        self.tokenizer = _local_tokenizer(str(tokenizer_path) if tokenizer_path else None)
        self.context_window = int(context_window or DEFAULT_CONTEXT_WINDOW)

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
        _check_options(options)
        firsts = {option: self.tokenizer.decode(self.tokenizer.encode(option, add_special_tokens=False)[:1])
                  for option in options}
        by_token: dict[str, str] = {}
        for option, first in firsts.items():
            if by_token.setdefault(first, option) != option:
                raise ValueError(f"options '{by_token[first]}' and '{option}' begin with the same token '{first}': "
                                 "the openai backend scores first tokens only; use the transformers backend")
        request = self._request(messages, GenerationParams(max_new_tokens=1), logprobs=True,
                                top_logprobs=OPENAI_TOP_LOGPROBS)
        try:
            response = self._call(request)
        except ValueError as error:
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
    (a 503 in the API), a request the server calls invalid → ValueError (a 422), each naming the server."""

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
                raise ValueError(f"{where} refused the request ({status}): {message}") from error
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


# ------------------------------------------------------------------------------------------------------ factory
_GENERATORS: dict[tuple, Generator] = {}
_GENERATORS_LOCK = threading.Lock()


def load_generator(settings: Settings, adapter_dir: str | Path | None = None) -> Generator:
    """The configured decoder, built once per process per (backend, model, adapter, device, window).

    `adapter_dir` selects the fine-tuned decoder (the pipeline passes `require_adapter(settings)`); the settings'
    own adapter_dir is not applied implicitly, so the base paths stay on the base model. With the openai backend
    an adapter cannot be loaded locally: the request names the adapter folder's name as the model, which is how
    vLLM serves LoRA adapters (`--enable-lora --lora-modules <folder name>=<adapter folder>`).
    """
    key = _cache_key(settings, adapter_dir)
    with _GENERATORS_LOCK:  # one load per key even when requests race at start-up
        if key not in _GENERATORS:
            _GENERATORS[key] = _build_generator(settings, adapter_dir)
        return _GENERATORS[key]


def clear_generator_cache() -> None:
    """Forget loaded decoders (tests; or to free memory after changing settings)."""
    with _GENERATORS_LOCK:
        _GENERATORS.clear()
    _local_tokenizer.cache_clear()


def _canonical(path: str | Path | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _cache_key(settings: Settings, adapter_dir: str | Path | None) -> tuple:
    if settings.backend == "openai":
        return ("openai", settings.openai_base_url, _served_model(settings, adapter_dir), settings.openai_api_key,
                settings.openai_timeout, settings.openai_max_retries, _canonical(settings.decoder_model),
                settings.context_window)
    return ("transformers", _canonical(settings.decoder_model), _canonical(adapter_dir), settings.device,
            settings.context_window)


def _served_model(settings: Settings, adapter_dir: str | Path | None) -> str:
    return Path(adapter_dir).name if adapter_dir else settings.openai_model


def _build_generator(settings: Settings, adapter_dir: str | Path | None) -> Generator:
    if settings.backend == "openai":
        # decoder_model names the local copy of the served model's tokenizer with this backend.
        return OpenAIGenerator(settings.openai_base_url, _served_model(settings, adapter_dir),
                               settings.openai_api_key, settings.openai_timeout, settings.openai_max_retries,
                               tokenizer_path=settings.decoder_model, context_window=settings.context_window)
    if settings.backend == "transformers":
        return TransformersGenerator(settings.decoder_model, settings.device, adapter_dir, settings.context_window)
    raise ValueError(f"unknown backend '{settings.backend}'; allowed: transformers, openai")
