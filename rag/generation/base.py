"""The decoder seam: what a backend is (`Generator`), what it takes (`GenerationParams`) and what it gives back
(`Generation`, `GenerationStream`). Backends: `rag.generation.transformers_backend` (in this process) and
`rag.generation.openai_backend` (an OpenAI-compatible server); `rag.generation.factory` builds the configured one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from collections.abc import Generator as PyGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rag.errors import UnavailableError, UserError

DEFAULT_CONTEXT_WINDOW = 8192  # when neither the settings nor the model say otherwise (SmolLM2's own value)
DEFAULT_MAX_NEW_TOKENS = 64  # every interface's default (CLI, API, eval): answers here are short
MAX_NEW_TOKENS = 32768  # the library's bound; a server lowers its own with RAG_MAX_NEW_TOKENS_LIMIT
# The library's bounds of GenerationParams (every interface: CLI, API, eval). The HTTP API takes tighter ones for
# some (api.config: REQUEST_MAX_TOP_K, REQUEST_MAX_SEED, REQUEST_MAX_STOP_SEQUENCES, REQUEST_MAX_STOP_CHARS).
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 1_000_000
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 200
MAX_SEED = 2**63 - 1
OPENAI_TOP_LOGPROBS = 20  # the most OpenAI's API (and vLLM's default --max-logprobs) returns


class GeneratorUnavailable(UnavailableError):
    """The decoder server cannot be reached, or it refused to serve (bad key, unknown model, overloaded)."""

    code = "generator_unavailable"



@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Inference parameters, the same for every path, backend and interface.

    temperature 0 means greedy decoding (then top_k, top_p and seed are not used). top_k / top_p of None mean
    "no such filter" when sampling, as in OpenAI's API, not the library's own defaults. `stop` strings end the
    reply and are not part of it; a single string is accepted as a one-element list.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, MAX_TOP_K)
        if self.top_p is not None:
            _check_float("top_p", self.top_p, 0.0, 1.0)
            if self.top_p == 0.0:
                raise UserError("top_p must be greater than 0 and at most 1 (1 = no nucleus filter), got 0")
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        _check_stop(self.stop)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{name} must be from {low} to {high}, got {value}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{name} must be from {low:g} to {high:g}, got {value:g}")


def _check_stop(stop: object) -> None:
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise UserError(f"stop must be a list of strings, got {stop!r}")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise UserError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise UserError(f"stop sequences must be non-empty and at most {MAX_STOP_CHARS} characters each")


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


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop sequence, and whether one occurred."""
    positions = [index for index in (text.find(s) for s in stop) if index >= 0]
    return (text[: min(positions)], True) if positions else (text, False)


def check_options(options: list[str]) -> None:
    if not options or any(not isinstance(o, str) or not o for o in options):
        raise UserError(f"options must be a non-empty list of non-empty strings, got {options!r}")
