"""The answer pipeline: question → retrieve → prompt → generate → Answer with citations, usage and timings.

Four paths share it: `prompt` (no retrieval), `rag`, `finetuned` (base + LoRA adapter, no retrieval) and
`finetuned-rag`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from rag.config import Settings
from rag.generate import Generation, GenerationParams, Generator, load_generator, require_adapter
from rag.prompt import Prompt, PromptBuilder, PromptMode, load_shots
from rag.span import SpanMatch, align_to_source
from rag.types import Choice, ScoredChunk

IDK = "I don't know."
CITATION = re.compile(r"\[(\d{1,2})\]")
# Below this token-F1 between the model's words and a source span, the output is not a quote of the sources and
# is returned as generated rather than forced onto a span.
MIN_SPAN_SCORE = 0.3


class AnswerPath(Choice, label="path"):
    PROMPT = "prompt"
    RAG = "rag"
    FINETUNED = "finetuned"
    FINETUNED_RAG = "finetuned-rag"

    @property
    def retrieves(self) -> bool:
        return self in (AnswerPath.RAG, AnswerPath.FINETUNED_RAG)

    @property
    def finetuned(self) -> bool:
        return self in (AnswerPath.FINETUNED, AnswerPath.FINETUNED_RAG)


@dataclass(frozen=True, slots=True)
class Citation:
    number: int  # the [n] of the prompt
    chunk_id: int | None
    source: str
    page: int | None
    heading: str | None
    snippet: str


@dataclass(slots=True)
class Answer:
    text: str
    citations: list[Citation]
    path: str
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    timings: dict[str, float] = field(default_factory=dict)  # retrieve_ms, prompt_ms, generate_ms, tokens_per_second
    raw_text: str = ""  # the decoder's own words, before alignment to a source span
    sources: list[Citation] = field(default_factory=list)  # every source the prompt held, cited or not

    def to_dict(self) -> dict:
        return asdict(self)


def quote_source(raw: str, question: str, sources: list[str]) -> SpanMatch | None:
    """The source span a decoder's answer means, when it matches one closely enough (see rag.span)."""
    match = align_to_source(CITATION.sub("", raw), question, sources)
    return match if match is not None and match.score >= MIN_SPAN_SCORE else None


def quoted(match: SpanMatch) -> str:
    """An answer that is a source's own words, with the marker of the source it quotes."""
    return f"{match.text} [{match.source_index + 1}]"


def _citation(number: int, hit: ScoredChunk, snippet: str | None = None) -> Citation:
    chunk = hit.chunk
    text = snippet or (chunk.text if len(chunk.text) <= 240 else chunk.text[:240] + "…")
    return Citation(number, chunk.id, chunk.source, chunk.page, chunk.heading, text)


class Pipeline:
    """Answers questions over an index.

    >>> pipeline = Pipeline(Settings(index_dir="rag-index"))  # doctest: +SKIP
    >>> answer = pipeline.answer("How do I disable timeouts?", path="rag")  # doctest: +SKIP
    >>> answer.text, answer.citations[0].source  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, retriever=None, generator: Generator | None = None,
                 finetuned_generator: Generator | None = None):
        self.settings = settings
        self._retriever = retriever
        self._generator = generator
        self._finetuned_generator = finetuned_generator

    # Models and index load on first use, once per pipeline.
    @cached_property
    def retriever(self):
        if self._retriever is not None:
            return self._retriever
        from rag.embed import Embedder
        from rag.retrieve import Retriever
        from rag.store import Store

        embedder = Embedder.from_settings(self.settings)
        return Retriever(Store.open(self.settings.index_dir, embedder.name), embedder)

    @cached_property
    def generator(self) -> Generator:
        return self._generator or load_generator(self.settings)

    @cached_property
    def finetuned_generator(self) -> Generator:
        if self._finetuned_generator is not None:
            return self._finetuned_generator
        return load_generator(self.settings, adapter_dir=require_adapter(self.settings))

    def generator_for(self, path: AnswerPath) -> Generator:
        return self.finetuned_generator if path.finetuned else self.generator

    def prepare(self, question: str, path: AnswerPath | str = AnswerPath.RAG, k: int | None = None,
                retriever: str | None = None, source: str | None = None, params: GenerationParams | None = None,
                shots_file: Path | None = None, shots: int = 3, choices: list[str] | None = None
                ) -> tuple[AnswerPath, Generator, Prompt, GenerationParams, dict[str, float]]:
        """Retrieval and prompt building: everything before the decoder runs."""
        if not question or not question.strip():
            raise ValueError("The question is empty.")
        path = AnswerPath.parse(path)
        params = params or GenerationParams()
        generator = self.generator_for(path)
        timings: dict[str, float] = {}
        hits: list[ScoredChunk] = []
        if path.retrieves:
            started = time.perf_counter()
            hits = self.retriever.retrieve(question, k or self.settings.answer_chunks, retriever, source)
            timings["retrieve_ms"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        builder = PromptBuilder(generator.tokenizer, self.settings.context_window or generator.context_window,
                                params.max_new_tokens,
                                shots=load_shots(shots_file, shots) if shots_file and not path.retrieves else None)
        if choices:
            prompt = builder.for_choices(question, hits, choices)
        else:
            mode = PromptMode.RAG if path.retrieves else (PromptMode.FEW_SHOT if shots_file else PromptMode.PROMPT_ONLY)
            prompt = builder.build(question, hits, mode)
        timings["prompt_ms"] = (time.perf_counter() - started) * 1000
        return path, generator, prompt, params, timings

    def answer(self, question: str, path: AnswerPath | str = AnswerPath.RAG, k: int | None = None, retriever: str | None = None,
               source: str | None = None, params: GenerationParams | None = None, shots_file: Path | None = None,
               shots: int = 3, choices: list[str] | None = None, extract: bool = True) -> Answer:
        """One answer. With `choices` (e.g. yes/no/maybe) the options are scored by likelihood, not generated."""
        path, generator, prompt, params, timings = self.prepare(
            question, path, k, retriever, source, params, shots_file, shots, choices)
        if choices:
            return self._choose(generator, prompt, choices, path, timings)
        started = time.perf_counter()
        generation = generator.generate(prompt.messages, params)
        timings["generate_ms"] = (time.perf_counter() - started) * 1000
        return self.finish(question, prompt, generation, path, timings, extract)

    def stream(self, question: str, path: AnswerPath | str = AnswerPath.RAG, k: int | None = None,
               retriever: str | None = None, source: str | None = None, params: GenerationParams | None = None,
               shots_file: Path | None = None, shots: int = 3, extract: bool = True) -> Iterator[str | Answer]:
        """Yields text pieces as the decoder produces them, then the final `Answer` (aligned, with citations)."""
        path, generator, prompt, params, timings = self.prepare(
            question, path, k, retriever, source, params, shots_file, shots)
        started = time.perf_counter()
        pieces = []
        # Closing the decoder's stream (here, or when our caller stops iterating) stops generation early.
        with generator.stream(prompt.messages, params) as stream:
            for piece in stream:
                pieces.append(piece)
                yield piece
        seconds = time.perf_counter() - started
        timings["generate_ms"] = seconds * 1000
        text = "".join(pieces)
        generation = stream.generation or Generation(
            text, prompt.token_count, len(generator.tokenizer.encode(text, add_special_tokens=False)), seconds, "stop")
        yield self.finish(question, prompt, generation, path, timings, extract)

    def finish(self, question: str, prompt: Prompt, generation: Generation, path: AnswerPath,
               timings: dict[str, float], extract: bool) -> Answer:
        """Turns the decoder's output into an answer that quotes and cites its sources."""
        raw = generation.text.strip()
        used = prompt.used_chunks
        sources = [_citation(number, hit) for number, hit in enumerate(used, 1)]
        timings["tokens_per_second"] = generation.tokens_out / generation.seconds if generation.seconds else 0.0
        usage = {"prompt_tokens": generation.tokens_in, "completion_tokens": generation.tokens_out}
        text, citations = raw, []
        if used and "don't know" not in raw.lower():
            cited = sorted({int(n) for n in CITATION.findall(raw) if 1 <= int(n) <= len(used)})
            match = quote_source(raw, question, [hit.chunk.text for hit in used]) if extract else None
            if match is not None:
                # The small model's wording wanders; the source's own words are the answer it was reaching for.
                text = quoted(match)
                citations = [_citation(match.source_index + 1, used[match.source_index], match.text)]
            else:
                citations = [sources[n - 1] for n in cited]
        elif not raw:
            text = IDK
        return Answer(text, citations, path.value, usage, timings, raw, sources)

    def _choose(self, generator: Generator, prompt: Prompt, choices: list[str], path: AnswerPath,
                timings: dict[str, float]) -> Answer:
        started = time.perf_counter()
        # Options are scored as the reply would begin ("Yes", not " yes"): see ENVIRONMENT.md's tokenisation note.
        options = {choice: choice[:1].upper() + choice[1:] for choice in choices}
        logprobs = generator.option_logprobs(prompt.messages, list(options.values()))
        best = max(choices, key=lambda choice: logprobs[options[choice]])
        timings["generate_ms"] = (time.perf_counter() - started) * 1000
        sources = [_citation(number, hit) for number, hit in enumerate(prompt.used_chunks, 1)]
        return Answer(best, sources, path.value, {"prompt_tokens": prompt.token_count, "completion_tokens": 0},
                      timings, raw_text=str({choice: round(logprobs[options[choice]], 3) for choice in choices}),
                      sources=sources)
