"""The answer pipeline: question → retrieve → prompt → generate → Answer with citations, usage and timings.

Four paths share it: `prompt` (no retrieval), `rag`, `finetuned` (base + LoRA adapter, no retrieval) and
`finetuned-rag`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from rag.answerability import Answerability, AnswerabilityModel, answerability_features
from rag.config import Settings
from rag.conversation import RewriteMode, Turn, rewrite_messages, standalone_question
from rag.generate import Generation, GenerationParams, Generator, load_generator, require_adapter
from rag.prompt import Prompt, PromptBuilder, PromptMode, load_shots
from rag.span import SpanMatch, align_to_source, grounded_share
from rag.types import AnswerPath, ScoredChunk

IDK = "I don't know."
NOT_ANSWERABLE = "The documents don't answer this question."
# Share of an answer's content words a source must contain to be cited for it (as in the eval's groundedness).
MIN_GROUNDED_SHARE = 0.8
CITATION = re.compile(r"\[(\d{1,2})\]")
# Below this token-F1 between the model's words and a source span, the output is not a quote of the sources and
# is returned as generated rather than forced onto a span.
MIN_SPAN_SCORE = 0.3
REWRITE_MAX_TOKENS = 48  # a standalone question, written by the decoder


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
    answerable: bool = True  # False: the sources do not hold the answer (text says so; `see_also` lists them)
    confidence: float | None = None  # calibrated probability that the sources hold the answer (retrieving paths)
    see_also: list[Citation] = field(default_factory=list)  # closest sources of an unanswerable question
    searched: str | None = None  # the standalone question retrieval used, when a follow-up was rewritten
    finish_reason: str = "stop"  # the decoder's: "stop", or "length" when max_new_tokens cut it

    def to_dict(self) -> dict:
        return asdict(self)


def quote_source(raw: str, question: str, sources: list[str]) -> SpanMatch | None:
    """The source span a decoder's answer means, when it matches one closely enough (see rag.span)."""
    match = align_to_source(CITATION.sub("", raw), question, sources)
    return match if match is not None and match.score >= MIN_SPAN_SCORE else None


def quoted(match: SpanMatch) -> str:
    """An answer that is a source's own words, with the marker of the source it quotes."""
    return f"{match.text} [{match.source_index + 1}]"


@dataclass(slots=True)
class Prepared:
    """Everything decided before the decoder runs."""

    path: AnswerPath
    generator: Generator
    prompt: Prompt
    params: GenerationParams
    timings: dict[str, float]
    answerability: Answerability | None = None  # retrieving paths only
    searched: str | None = None  # the standalone question, when it differs from the one asked

    @property
    def abstains(self) -> bool:
        return self.answerability is not None and not self.answerability.answerable


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

    def prepare(self, question: str, path: AnswerPath | str | None = None, k: int | None = None,
                retriever: str | None = None, source: str | None = None, params: GenerationParams | None = None,
                shots_file: Path | None = None, shots: int = 3, choices: list[str] | None = None,
                history: Sequence[Turn] = ()) -> Prepared:
        """Retrieval, the answerability check and prompt building: everything before the decoder runs."""
        if not question or not question.strip():
            raise ValueError("The question is empty.")
        path = AnswerPath.parse(path) if path else self.settings.default_path
        params = params or GenerationParams()
        generator = self.generator_for(path)
        timings: dict[str, float] = {}
        hits: list[ScoredChunk] = []
        answerability, searched = None, None
        if path.retrieves:
            started = time.perf_counter()
            searched = self.standalone(history, question)
            hits = self.retriever.retrieve(searched, k or self.settings.answer_chunks, retriever, source)
            if not choices:
                features = answerability_features(searched, hits, self.retriever.similarities(searched, hits))
                answerability = self.answerability_model.assess(features, self.settings.answerable_threshold)
            timings["retrieve_ms"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        builder = PromptBuilder(generator.tokenizer, self.settings.context_window or generator.context_window,
                                params.max_new_tokens,
                                shots=load_shots(shots_file, shots) if shots_file and not path.retrieves else None)
        if choices:
            prompt = builder.for_choices(question, hits, choices)
        else:
            mode = PromptMode.RAG if path.retrieves else (PromptMode.FEW_SHOT if shots_file else PromptMode.PROMPT_ONLY)
            prompt = builder.build(question, hits, mode, history)
        timings["prompt_ms"] = (time.perf_counter() - started) * 1000
        return Prepared(path, generator, prompt, params, timings, answerability,
                        searched if searched != question else None)

    def standalone(self, history: Sequence[Turn], question: str) -> str:
        """The question retrieval searches for: a follow-up made standalone (settings.follow_up_rewrite)."""
        mode = RewriteMode.parse(self.settings.follow_up_rewrite)
        if not history or mode is RewriteMode.NONE:
            return question
        if mode is RewriteMode.RULE:
            return standalone_question(history, question)
        generation = self.generator.generate(rewrite_messages(history, question),
                                             GenerationParams(max_new_tokens=REWRITE_MAX_TOKENS))
        return generation.text.strip().split("\n")[0] or question

    @cached_property
    def answerability_model(self) -> AnswerabilityModel:
        return AnswerabilityModel.load()

    def answer(self, question: str, path: AnswerPath | str | None = None, k: int | None = None,
               retriever: str | None = None, source: str | None = None, params: GenerationParams | None = None,
               shots_file: Path | None = None, shots: int = 3, choices: list[str] | None = None,
               extract: bool = True, history: Sequence[Turn] = ()) -> Answer:
        """One answer. With `choices` (e.g. yes/no/maybe) the options are scored by likelihood, not generated.
        `history` holds the conversation's earlier turns (oldest first) for a follow-up question."""
        prepared = self.prepare(question, path, k, retriever, source, params, shots_file, shots, choices, history)
        if choices:
            return self._choose(prepared, choices)
        if prepared.abstains and self.settings.abstain:
            return self.not_answerable(prepared)
        started = time.perf_counter()
        generation = prepared.generator.generate(prepared.prompt.messages, prepared.params)
        prepared.timings["generate_ms"] = (time.perf_counter() - started) * 1000
        return self.finish(question, prepared, generation, extract)

    def stream(self, question: str, path: AnswerPath | str | None = None, k: int | None = None,
               retriever: str | None = None, source: str | None = None, params: GenerationParams | None = None,
               shots_file: Path | None = None, shots: int = 3, extract: bool = True,
               history: Sequence[Turn] = ()) -> Iterator[str | Answer]:
        """Yields text pieces as the decoder produces them, then the final `Answer` (aligned, with citations)."""
        prepared = self.prepare(question, path, k, retriever, source, params, shots_file, shots, None, history)
        if prepared.abstains and self.settings.abstain:
            yield NOT_ANSWERABLE
            yield self.not_answerable(prepared)
            return
        generator, prompt = prepared.generator, prepared.prompt
        started = time.perf_counter()
        pieces = []
        # Closing the decoder's stream (here, or when our caller stops iterating) stops generation early.
        with generator.stream(prompt.messages, prepared.params) as stream:
            for piece in stream:
                pieces.append(piece)
                yield piece
        seconds = time.perf_counter() - started
        prepared.timings["generate_ms"] = seconds * 1000
        text = "".join(pieces)
        generation = stream.generation or Generation(
            text, prompt.token_count, len(generator.tokenizer.encode(text, add_special_tokens=False)), seconds, "stop")
        yield self.finish(question, prepared, generation, extract)

    def not_answerable(self, prepared: Prepared) -> Answer:
        """The answer when the sources do not hold one: said plainly, the closest sources as "see also"."""
        sources = [_citation(number, hit) for number, hit in enumerate(prepared.prompt.used_chunks, 1)]
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        return Answer(NOT_ANSWERABLE, [], prepared.path.value, usage, prepared.timings, "", sources, False,
                      _confidence(prepared), sources, prepared.searched)

    def finish(self, question: str, prepared: Prepared, generation: Generation, extract: bool = True) -> Answer:
        """Turns the decoder's output into an answer that quotes and cites its sources.

        A source is cited only for words it contains: a quoted span cites the source it was copied from; an answer
        that is no quote cites the sources its [n] markers name only where they hold most of its content words."""
        raw = generation.text.strip()
        used = prepared.prompt.used_chunks
        sources = [_citation(number, hit) for number, hit in enumerate(used, 1)]
        timings = prepared.timings
        timings["tokens_per_second"] = generation.tokens_out / generation.seconds if generation.seconds else 0.0
        usage = {"prompt_tokens": generation.tokens_in, "completion_tokens": generation.tokens_out}
        answer = Answer(raw, [], prepared.path.value, usage, timings, raw, sources,
                        confidence=_confidence(prepared), searched=prepared.searched,
                        finish_reason=generation.finish_reason or "stop")
        if used and "don't know" in raw.lower():
            answer.text, answer.answerable, answer.see_also = NOT_ANSWERABLE, False, sources
        elif used:
            match = quote_source(raw, question, [hit.chunk.text for hit in used]) if extract else None
            if match is not None:
                # The small model's wording wanders; the source's own words are the answer it was reaching for.
                answer.text = quoted(match)
                answer.citations = [_citation(match.source_index + 1, used[match.source_index], match.text)]
            else:
                cited = sorted({int(n) for n in CITATION.findall(raw) if 1 <= int(n) <= len(used)})
                answer.citations = [sources[n - 1] for n in cited
                                    if (grounded_share(raw, used[n - 1].chunk.text) or 0) >= MIN_GROUNDED_SHARE]
        elif not raw:
            answer.text = IDK
        return answer

    def _choose(self, prepared: Prepared, choices: list[str]) -> Answer:
        started = time.perf_counter()
        # Options are scored as the reply would begin ("Yes", not " yes"): see ENVIRONMENT.md's tokenisation note.
        options = {choice: choice[:1].upper() + choice[1:] for choice in choices}
        logprobs = prepared.generator.option_logprobs(prepared.prompt.messages, list(options.values()))
        best = max(choices, key=lambda choice: logprobs[options[choice]])
        prepared.timings["generate_ms"] = (time.perf_counter() - started) * 1000
        sources = [_citation(number, hit) for number, hit in enumerate(prepared.prompt.used_chunks, 1)]
        return Answer(best, sources, prepared.path.value,
                      {"prompt_tokens": prepared.prompt.token_count, "completion_tokens": 0}, prepared.timings,
                      raw_text=str({choice: round(logprobs[options[choice]], 3) for choice in choices}),
                      sources=sources)


def _confidence(prepared: Prepared) -> float | None:
    return prepared.answerability.confidence if prepared.answerability else None
