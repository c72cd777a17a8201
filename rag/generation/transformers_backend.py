"""The decoder run in this process with `transformers`: a local HF folder, a .gguf file, or the packaged
SmolLM2-135M-Instruct. Streaming runs `model.generate` in a worker thread and hands out the stable part of the
growing reply, so `stream()` joined equals `generate().text` at temperature 0.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Generator as PyGenerator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from rag.models import load_causal_lm, transformers_lock, resolve_decoder

logger = logging.getLogger("rag.generation")


# -- how many torch threads one generation uses
# torch's intra-op threads spin-wait for each other at every op. When another process holds a core, a thread of ours
# gets descheduled and its peers spin until it runs again: on 2 cores with a one-core hog beside it, SmolLM2-135M
# answered at 0.23 req/s with 1 thread but 0.03 req/s (~30 s an answer) with torch's default 2 (issue #32).
# So before each generation we count the cores the other processes kept busy since the last look (/proc/stat less
# our own CPU time, as a share of the machine, scaled to the cores we may run on) and use the cores left, at least 1
# and at most torch's default. RAG_DECODER_THREADS=N (Settings.decoder_threads) forces N; unset is this rule.
# bench/decoder_threads.py, 2 cores (avx2), other test suites keeping ~1.9 cores busy throughout (load 5-6), p50
# seconds per 32-token answer over 8 alternating rounds (2026-12-07):
#   threads   as it was   + one-core hog
#   1          4.9         11.1
#   2         16.4         29.2     (torch's default: 3x slower even without the hog)
#   auto       5.1         10.2     (picked 1 every time)
# A thread count a busy machine cannot give at once is what hurts, so free cores, not total cores, size the pool.
_RESAMPLE_AFTER_S = 5.0  # an older reading averages over idle time: take a fresh one
_SAMPLE_S = 0.1


def _cpus_allowed() -> int:
    """The cores this process may run on: its CPU affinity, lowered to a cgroup v2 CPU quota (a container's
    `--cpus`) where there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _read_cpu_times() -> tuple[float, float, float] | None:
    """(busy jiffies of the whole machine, all its jiffies, this process's jiffies); None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    mine = os.times()
    return float(total - idle), float(total), (mine.user + mine.system) * os.sysconf("SC_CLK_TCK")


def pick_decoder_threads(setting: int | None, cpus: int, others_busy: float | None,
                         default: int | None = None) -> int:
    """Threads for one generation. `setting`: a number forces it (an explicit setting always wins); None: the cores
    among `cpus` that other processes leave free (`others_busy`: cores they keep busy, None if unknown), at least 1
    and at most `default` (torch's own choice, normally `cpus`)."""
    if setting is not None:
        if setting < 1:
            raise UserError(f"RAG_DECODER_THREADS must be at least 1, not {setting}")
        return setting
    ceiling = max(1, min(cpus, default or cpus))
    if others_busy is None:
        return ceiling
    return max(1, min(ceiling, cpus - int(others_busy + 0.5)))  # half a core busy or more counts as one


class DecoderThreads:
    """Chooses the torch thread count before each generation (see `pick_decoder_threads`). `read_cpu_times` is
    injectable for tests: returns (machine busy, machine total, own) in jiffies, or None."""

    def __init__(self, setting: int | None = None, cpus: int | None = None,
                 read_cpu_times: Callable[[], tuple[float, float, float] | None] = _read_cpu_times,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.setting = setting
        pick_decoder_threads(self.setting, 1, None)  # a bad setting fails at load, not at the first answer
        self.cpus = cpus or _cpus_allowed()
        self._read, self._clock, self._sleep = read_cpu_times, clock, sleep
        self._last: tuple[float, tuple[float, float, float]] | None = None
        self.others_busy: float | None = None  # the last reading and choice, for logs and benchmarks
        self.last: int | None = None

    def _others_busy(self) -> float | None:
        now, reading = self._clock(), self._read()
        if reading is None:
            return None
        if self._last is None or now - self._last[0] > _RESAMPLE_AFTER_S:
            self._sleep(_SAMPLE_S)
            self._last = (now, reading)
            now, reading = self._clock(), self._read()
            if reading is None:
                return None
        (_, (busy0, total0, mine0)), (busy1, total1, mine1) = self._last, reading
        self._last = (now, reading)
        if total1 <= total0:
            return self.others_busy
        others_share = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (total1 - total0)  # of all the machine's CPUs
        return others_share * self.cpus  # /proc/stat may count a whole host: take its share of our cores

    def pick(self, default: int | None = None) -> int:
        """Threads for the generation about to run."""
        if self.setting is not None:
            self.last = pick_decoder_threads(self.setting, self.cpus, None, default)
        else:
            self.others_busy = self._others_busy()
            self.last = pick_decoder_threads(None, self.cpus, self.others_busy, default)
        return self.last


# -- decoding concurrent requests together
# Greedy requests that wait for the model while another runs are decoded together in one `model.generate` call (left
# padded), at most this many: a small decoder's step on the CPU costs its weight reads and per-op overhead far more
# than arithmetic, so eight sequences take little longer a step than one (bench/serving.py, docs/benchmarks.md). The
# API lets that many generations in at once by default (RAG_MAX_CONCURRENT_GENERATIONS). A request that samples runs
# alone: its seed's draws must not depend on who else was waiting. A request alone is decoded exactly as before.
MAX_BATCH = 8


@dataclass(eq=False)
class _Request:
    """One generation waiting for, or in, a batch; `done` is set once `result` or `error` is."""

    messages: list[dict]
    params: GenerationParams
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None


class _BatchWatch:
    """Called by `model.generate` after every new token (as a StoppingCriteria): per row, decodes the reply so far,
    hands it to that request's stream, and stops the row on its stop string, its own max_new_tokens, or when its
    stream was closed; it records where each row stopped. Decoding the whole reply each step costs microseconds next
    to a forward pass and sees stop strings that span tokens."""

    def __init__(self, tokenizer: Any, width: int, rows: list[_Request]):
        self.tokenizer, self.width, self.rows = tokenizer, width, rows
        self.stopped_at: list[int | None] = [None] * len(rows)  # new tokens of the row when it was stopped here

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        generated = input_ids.shape[1] - self.width
        for row, request in enumerate(self.rows):
            if self.stopped_at[row] is not None:
                continue
            done = generated >= request.params.max_new_tokens or (request.cancel is not None
                                                                   and request.cancel.is_set())
            if request.params.stop or request.on_text:
                text = self.tokenizer.decode(input_ids[row, self.width:], skip_special_tokens=True)
                if request.on_text:
                    request.on_text(text)
                done = done or any(s in text for s in request.params.stop)
            if done:
                self.stopped_at[row] = generated
        stopped = [at is not None for at in self.stopped_at]
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)


def _stopping_criteria(watch: _BatchWatch) -> Any:
    with transformers_lock():
        from transformers import StoppingCriteria, StoppingCriteriaList

    class BatchWatchCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return watch(input_ids, scores, **kwargs)

    return StoppingCriteriaList([BatchWatchCriteria()])


class TransformersGenerator:
    """A decoder run in this process with transformers: a local HF folder, a .gguf file (dequantised on load), or
    the packaged SmolLM2-135M-Instruct. cuda in bf16 when present, else cpu in fp32. The model's name is the one
configured (the .gguf's file name), whatever folder a cached copy was loaded from.

    One `model.generate` runs at a time per model (a lock): torch already uses every core for it, and the fast
    tokenizer is not safe to share between threads. Greedy requests that arrive while it runs are decoded together
    in the next one (`MAX_BATCH`). On the CPU each call uses as many torch threads as other processes leave cores
    free (`DecoderThreads`); `threads` (Settings.decoder_threads) forces a number.

    >>> generator = TransformersGenerator()  # doctest: +SKIP
    >>> hello = [{"role": "user", "content": "Say hi"}]  # doctest: +SKIP
    >>> generator.generate(hello, GenerationParams(max_new_tokens=8)).text  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, device: str = "auto", adapter_dir: str | Path | None = None,
                 context_window: int | None = None, cache_dir: Path | None = None, threads: int | None = None):
        folder, gguf_file = resolve_decoder(model)  # ModelNotFoundError before any slow import or load
        adapter = checked_adapter(adapter_dir, model)  # refused before spending seconds on loading
        # With caching on (`cache_dir`), a .gguf loads from its dequantised copy and a decoder with an adapter from
        # its merged copy, each made on first use.
        source = cached_decoder(model, cache_dir)
        name = gguf_file or folder.name
        if adapter is not None and cache_dir is not None and source is not None and Path(source).is_dir():
            source, name, adapter = merged_copy(Path(source), adapter, cache_dir), f"{name}+{adapter.name}", None
        self._threads = DecoderThreads(threads)  # a bad count fails before the slow load
        loaded, tokenizer, resolved = load_causal_lm(source, device)
        self._setup(loaded, tokenizer, resolved, name, adapter, context_window)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, device: str, name: str, adapter_dir: str | Path | None = None,
                    base: str | Path | None = None, context_window: int | None = None,
                    threads: int | None = None) -> TransformersGenerator:
        """Wraps a model already in memory (say, right after `rag finetune`) instead of loading it again: GGUF
        loading costs seconds. `base` is what the model was loaded from (None: the packaged decoder); an adapter
        is checked against it. The model is used as given, so pass a copy if the caller keeps using it."""
        generator = cls.__new__(cls)
        generator._threads = DecoderThreads(threads)
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
        self._waiting: list[_Request] = []  # in arrival order, guarded by _waiting_lock
        self._waiting_lock = threading.Lock()
        self._default_threads: int | None = None  # torch's own thread count, read at the first call

    @contextmanager
    def _sized_threads(self) -> Iterator[int]:
        """Under the lock: torch uses the threads `DecoderThreads` picks for this call (a process-wide setting, set
        in the thread that runs the model) and gets its previous count back afterwards. cuda: left alone."""
        import torch

        if self.device != "cpu":
            yield torch.get_num_threads()
            return
        previous = torch.get_num_threads()
        if self._default_threads is None:
            self._default_threads = previous
        threads = self._threads.pick(self._default_threads)
        if threads != previous:
            torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            if threads != previous:
                torch.set_num_threads(previous)

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
        with self._lock, self._sized_threads(), torch.inference_mode():
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
        with self._lock, self._sized_threads(), torch.inference_mode():
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

    def _generate_kwargs(self, inputs: dict, params: GenerationParams, watch: _BatchWatch) -> dict:
        """Exactly our parameters, nothing inherited: with sampling, top_k/top_p of None are passed as 'off'
        (transformers would otherwise apply top_k=50); greedy clears any sampling defaults of the model."""
        kwargs: dict[str, Any] = dict(**inputs, max_new_tokens=params.max_new_tokens, do_sample=params.sampling,
                                      pad_token_id=self._pad_id, stopping_criteria=_stopping_criteria(watch))
        if params.sampling:
            kwargs.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def _run(self, messages: list[dict], params: GenerationParams, on_text: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None) -> Generation:
        """One request's generation; `generate()` and `stream()` both come here, so their texts agree. The thread
        that gets the model decodes the oldest waiting requests (its own among them, or in a later round)."""
        request = _Request(messages, params, on_text, cancel)
        with self._waiting_lock:
            self._waiting.append(request)
        with self._lock:
            while not request.done.is_set():
                self._decode(self._next_batch())
        if request.error is not None:
            raise request.error
        return request.result

    def _next_batch(self) -> list[_Request]:
        """The oldest waiting request, and the greedy ones after it when it is greedy."""
        with self._waiting_lock:
            first = self._waiting[0]
            batch = [first] if first.params.sampling else \
                [request for request in self._waiting if not request.params.sampling][:MAX_BATCH]
            self._waiting = [request for request in self._waiting if request not in batch]
        return batch

    def _decode(self, batch: list[_Request]) -> None:
        """One `model.generate` over the batch's prompts, left-padded; each request gets its own result or error."""
        import torch

        try:
            with self._sized_threads(), torch.inference_mode():
                rows, prompts = [], []
                for request in batch:
                    try:
                        prompt = self._encode(request.messages)["input_ids"][0].tolist()
                        self._check_room(len(prompt), request.params.max_new_tokens)
                    except UserError as error:  # this request's own mistake: the others go on
                        request.error = error
                        continue
                    rows.append(request)
                    prompts.append(prompt)
                if not rows:
                    return
                width = max(map(len, prompts))
                inputs = {"input_ids": torch.tensor([[self._pad_id] * (width - len(p)) + p for p in prompts],
                                                    device=self.device),
                          "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                                         device=self.device)}
                params = rows[0].params if len(rows) == 1 else GenerationParams(
                    max_new_tokens=max(request.params.max_new_tokens for request in rows))
                watch = _BatchWatch(self.tokenizer, width, rows)
                if params.sampling and params.seed is not None:
                    torch.manual_seed(params.seed)  # under the lock: the global RNG is ours for this call
                started = time.perf_counter()
                output = self.model.generate(**self._generate_kwargs(inputs, params, watch))
                seconds = time.perf_counter() - started
                for row, (request, prompt) in enumerate(zip(rows, prompts)):
                    request.result = self._generation(output[row, width:].tolist(), watch.stopped_at[row],
                                                      len(prompt), seconds, request)
        except BaseException as error:  # noqa: BLE001 (each waiting caller re-raises it in its own thread)
            for request in batch:
                if request.result is None and request.error is None:
                    request.error = error
        finally:
            for request in batch:
                request.done.set()

    def _generation(self, new_tokens: list[int], stopped_at: int | None, tokens_in: int, seconds: float,
                    request: _Request) -> Generation:
        """A row's reply: its tokens up to where it ended (its end-of-sequence token, or where the watch stopped
        it; after that come the padding of rows still running), and why it ended."""
        end = next((index + 1 for index, token in enumerate(new_tokens) if token in self._eos_ids), len(new_tokens))
        new_tokens = new_tokens[:min(end, stopped_at or end)]
        params, cancel = request.params, request.cancel
        text, stopped = cut_at_stop(self.tokenizer.decode(new_tokens, skip_special_tokens=True), params.stop)
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
