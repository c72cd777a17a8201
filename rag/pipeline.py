"""The answer pipeline: question → retrieve → prompt → generate → Answer with citations, usage and timings.

Four paths share it: `prompt` (no retrieval), `rag`, `finetuned` (base + LoRA adapter, no retrieval) and
`finetuned-rag`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from rag.answerability import Answerability, AnswerabilityModel, answerability_features
from rag.config import Settings
from rag.conversation import RewriteMode, Turn, rewrite_messages, standalone_question
from rag.errors import UserError
from rag.evidence import EVIDENCE_CHUNKS, Evidence, asks_figure, asks_how_to, computed_change, select_evidence
from rag.generation import Generation, GenerationParams, Generator, adapter_for, load_generator
from rag.pages import page_of_quote
from rag.prompt import Prompt, PromptBuilder, PromptMode, load_shots
from rag.span import SpanMatch, align_to_source, grounded_share
from rag.store.terms import terms
from rag.types import AnswerPath, RetrieverKind, ScoredChunk, check_collection

IDK = "I don't know."
NOT_ANSWERABLE = "The documents don't answer this question."
# Share of an answer's content words a source must contain to be cited for it (as in the eval's groundedness).
MIN_GROUNDED_SHARE = 0.8
CITATION = re.compile(r"\[(\d{1,2})\]")
# Below this token-F1 between the model's words and a source span, the output is not a quote of the sources and
# is returned as generated rather than forced onto a span.
MIN_SPAN_SCORE = 0.3
REWRITE_MAX_TOKENS = 48  # a standalone question, written by the decoder
DIGIT = re.compile(r"\d")
EVIDENCE_IN_TEXT = 3  # quotes of one source an evidence-led answer shows in its text
# What an answer states that its sources must hold: figures (with a sign, currency, decimals, %) and capitalised
# names of two or more words.
CLAIM = re.compile(r"[$€£]?\(?-?\d[\d,]*(?:\.\d+)?\)?%?|\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+\b")


@dataclass(frozen=True, slots=True)
class Citation:
    number: int  # the [n] of the prompt
    chunk_id: int | None
    source: str
    page: int | None
    heading: str | None
    snippet: str


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """One question and how to answer it: the same options for `Pipeline.answer/stream`, `rag ask` and the API.

    `path` None means `Settings.default_path`; `k` None means `Settings.prompt_chunks`; `shots_file` gives few-shot
    examples to the prompt-only path; `choices` (e.g. yes/no/maybe) are scored by likelihood instead of generating;
    `extract` aligns the answer to the best-matching span of its sources; `history` holds the conversation's earlier
    turns, oldest first, for a follow-up question.
    """

    question: str
    path: AnswerPath | None = None
    k: int | None = None
    retriever: RetrieverKind = RetrieverKind.HYBRID
    source: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    shots_file: Path | None = None
    shots: int = 3
    choices: tuple[str, ...] | None = None
    extract: bool = True
    history: tuple[Turn, ...] = ()
    collection: str | None = None  # None: Settings.collection (a name: a request never reads every collection)

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise UserError("The question is empty.")
        object.__setattr__(self, "path", AnswerPath.parse(self.path) if self.path else None)
        object.__setattr__(self, "history", tuple(self.history))
        object.__setattr__(self, "retriever", RetrieverKind.parse(self.retriever or RetrieverKind.HYBRID))
        object.__setattr__(self, "params", self.params or GenerationParams())
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices) or None)
        if self.collection is not None:
            check_collection(self.collection)

    @classmethod
    def of(cls, question: str | AnswerRequest, **options: object) -> AnswerRequest:
        """A request from a question and keyword options, or the request itself."""
        if isinstance(question, AnswerRequest):
            if options:
                raise TypeError("give either an AnswerRequest or a question with options, not both")
            return question
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown answer options {unknown}; allowed: {sorted(known - {'question'})}")
        return cls(question, **{key: value for key, value in options.items() if value is not None})


@dataclass(frozen=True, slots=True)
class PreparedAnswer:
    """Everything before the decoder runs: the request (its path resolved), the decoder that answers it, the prompt
    built for it and, on retrieving paths, whether its sources hold the answer."""

    request: AnswerRequest
    generator: Generator
    prompt: Prompt
    timings: dict[str, float]
    answerability: Answerability | None = None
    searched: str | None = None  # the standalone question retrieval used, when it differs from the one asked
    evidence_hits: list[ScoredChunk] = field(default_factory=list)  # the ranking evidence is quoted from

    @property
    def abstains(self) -> bool:
        return self.answerability is not None and not self.answerability.answerable


@dataclass(slots=True)
class Answer:
    """An answer with its citations. `to_dict()` is the JSON of `rag ask --json` and the API's answer body."""

    text: str
    citations: list[Citation]
    path: str
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    timings: dict[str, float] = field(default_factory=dict)  # retrieve_ms, prompt_ms, generate_ms, tokens_per_second
    raw_text: str = ""  # the decoder's own words, before alignment to a source span
    sources: list[Citation] = field(default_factory=list)  # every source the prompt held, cited or not
    finish_reason: str = "stop"  # the decoder's: 'stop' (end of turn or a stop sequence), 'length', 'cancelled'
    answerable: bool = True  # False: the sources do not hold the answer (text says so; `see_also` lists them)
    confidence: float | None = None  # calibrated probability that the sources hold the answer (retrieving paths)
    see_also: list[Citation] = field(default_factory=list)  # closest sources of an unanswerable question
    searched: str | None = None  # the standalone question retrieval used, when a follow-up was rewritten
    # Quoted spans of the sources that answer the question (rag.evidence), best first; `Evidence.number` is the
    # [n] of `sources`, which lists the prompt's sources and then any further source a quote comes from.
    evidence: list[Evidence] = field(default_factory=list)
    # Whether the figures and names of `text` are found in its evidence or cited sources: None when the text is
    # the evidence itself or holds no figure or name to check; False: shown, never cited.
    supported: bool | None = None

    def to_dict(self) -> dict:
        """The answer as JSON: the text is named `answer` (one name in the CLI and the API)."""
        data = asdict(self)
        data["answer"] = data.pop("text")
        data["evidence"] = [{**asdict(evidence), "readable": evidence.readable()} for evidence in self.evidence]
        data["timings"] = {key: round(value, 3) for key, value in data["timings"].items()}
        return data


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
    return Citation(number, chunk.id, chunk.name, chunk.page, chunk.heading, text)


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
        self._retriever_lock = threading.Lock()
        self._generator = generator
        self._finetuned_generator = finetuned_generator

    # Models and index load on first use, once per pipeline.
    @cached_property
    def embedder(self):
        """The query encoder: a given retriever's, else the configured one."""
        if self._retriever is not None:
            return self._retriever.embedder
        from rag.embed import Embedder

        return Embedder.from_settings(self.settings)

    @property
    def retriever(self):
        """The retriever answers search with: the one given, the one `serve_from` set, else the configured index's
        (opened on first use)."""
        with self._retriever_lock:
            if self._retriever is None:
                from rag.index import Index

                self._retriever = Index.open(self.settings, self.embedder.name).retriever(self.embedder)
            return self._retriever

    def serve_from(self, retriever) -> None:
        """Answer from this retriever from now on: a server that keeps its own index open and refreshed hands
        its retriever over (requests in flight finish on the one they started with)."""
        with self._retriever_lock:
            self._retriever = retriever

    @cached_property
    def generator(self) -> Generator:
        return self._generator or load_generator(self.settings)

    @cached_property
    def finetuned_generator(self) -> Generator:
        if self._finetuned_generator is not None:
            return self._finetuned_generator
        return load_generator(self.settings, adapter_dir=adapter_for(AnswerPath.FINETUNED, self.settings))

    def generator_for(self, path: AnswerPath) -> Generator:
        return self.finetuned_generator if path.finetuned else self.generator

    def preload(self, paths: list[AnswerPath]) -> None:
        """Start loading the decoders these paths need in a background thread, so that loading overlaps the
        retriever's start (imports, embedder, index): a one-shot `rag ask` starts answering sooner. A failure is
        left for the answer itself to raise (load_generator builds each decoder once, whichever thread asks)."""
        def load() -> None:
            for path in paths:
                try:
                    self.generator_for(path)
                except Exception:  # noqa: BLE001 (raised again, to the caller, when the path answers)
                    return

        threading.Thread(target=load, name="decoder-preload", daemon=True).start()

    def prepare(self, request: AnswerRequest) -> PreparedAnswer:
        """Retrieval, the answerability check and prompt building: everything before the decoder runs."""
        if request.path is None:
            request = replace(request, path=self.settings.default_path)
        path, params = request.path, request.params
        timings: dict[str, float] = {}
        hits: list[ScoredChunk] = []
        evidence_hits: list[ScoredChunk] = []
        answerability, searched = None, request.question
        if path.retrieves:  # first: a missing index is reported before seconds are spent loading a decoder
            started = time.perf_counter()
            searched = self.standalone(request.history, request.question)
            collection = request.collection or self.settings.collection
            k = request.k or self.settings.prompt_chunks
            evidence_hits = self.retriever.retrieve(searched, max(k, EVIDENCE_CHUNKS), request.retriever,
                                                    request.source, collection=collection)
            hits = evidence_hits[:k]
            if not request.choices:
                similarities = self.retriever.similarities(searched, hits, collection=collection)
                features = answerability_features(searched, hits, similarities)
                answerability = self.answerability_model.assess(features, self.settings.answerable_threshold)
            timings["retrieve_ms"] = (time.perf_counter() - started) * 1000
        generator = self.generator_for(path)
        started = time.perf_counter()
        few_shot = request.shots_file is not None and not path.retrieves
        builder = PromptBuilder(generator.tokenizer, self.settings.context_window or generator.context_window,
                                params.max_new_tokens,
                                shots=load_shots(request.shots_file, request.shots) if few_shot else None)
        if request.choices:
            prompt = builder.for_choices(request.question, hits, list(request.choices))
        else:
            mode = PromptMode.RAG if path.retrieves else (PromptMode.FEW_SHOT if few_shot else PromptMode.PROMPT_ONLY)
            prompt = builder.build(request.question, hits, mode, request.history)
        timings["prompt_ms"] = (time.perf_counter() - started) * 1000
        return PreparedAnswer(request, generator, prompt, timings, answerability,
                              searched if searched != request.question else None, evidence_hits)

    def standalone(self, history: tuple[Turn, ...], question: str) -> str:
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

    def answer(self, question: str | AnswerRequest, **options) -> Answer:
        """One answer, for an `AnswerRequest` or a question and its options (the request's fields). With `choices`
        (e.g. yes/no/maybe) the options are scored by likelihood, not generated."""
        prepared = self.prepare(AnswerRequest.of(question, **options))
        if prepared.request.choices:
            return self._choose(prepared)
        if prepared.abstains and self.settings.abstain:
            return self.not_answerable(prepared)
        started = time.perf_counter()
        generation = prepared.generator.generate(prepared.prompt.messages, prepared.request.params)
        prepared.timings["generate_ms"] = (time.perf_counter() - started) * 1000
        return self.finish(prepared, generation)

    def stream(self, question: str | AnswerRequest, **options) -> Iterator[str | Answer]:
        """Yields text pieces as the decoder produces them, then the final `Answer` (aligned, with citations)."""
        prepared = self.prepare(AnswerRequest.of(question, **options))
        if prepared.request.choices:
            raise UserError("Closed-set choices are scored, not generated: they cannot be streamed.")
        if prepared.abstains and self.settings.abstain:  # nothing is generated: the answer alone, no tokens
            yield self.not_answerable(prepared)
            return
        generator, prompt = prepared.generator, prepared.prompt
        started = time.perf_counter()
        pieces = []
        # Closing the decoder's stream (here, or when our caller stops iterating) stops generation early.
        with generator.stream(prompt.messages, prepared.request.params) as stream:
            for piece in stream:
                pieces.append(piece)
                yield piece
        seconds = time.perf_counter() - started
        prepared.timings["generate_ms"] = seconds * 1000
        text = "".join(pieces)
        generation = stream.generation or Generation(
            text, prompt.token_count, len(generator.tokenizer.encode(text, add_special_tokens=False)), seconds, "stop")
        yield self.finish(prepared, generation)

    def not_answerable(self, prepared: PreparedAnswer) -> Answer:
        """The answer when the sources do not hold one: said plainly, the closest sources as "see also"."""
        sources = [_citation(number, hit) for number, hit in enumerate(prepared.prompt.used_chunks, 1)]
        return Answer(NOT_ANSWERABLE, [], prepared.request.path.value, {"prompt_tokens": 0, "completion_tokens": 0},
                      prepared.timings, "", sources, answerable=False, confidence=_confidence(prepared),
                      see_also=sources, searched=prepared.searched)

    def finish(self, prepared: PreparedAnswer, generation: Generation) -> Answer:
        """Turns the decoder's output into an answer that quotes and cites its sources.

        A source is cited only for words it contains: a quoted span cites the source it was copied from; an answer
        that is no quote cites the sources its [n] markers name only where they hold most of its content words."""
        request, prompt, timings = prepared.request, prepared.prompt, prepared.timings
        raw = generation.text.strip()
        used = prompt.used_chunks
        sources = [_citation(number, hit) for number, hit in enumerate(used, 1)]
        timings["tokens_per_second"] = generation.tokens_out / generation.seconds if generation.seconds else 0.0
        usage = {"prompt_tokens": generation.tokens_in, "completion_tokens": generation.tokens_out}
        answer = Answer(raw, [], request.path.value, usage, timings, raw, sources, generation.finish_reason,
                        confidence=_confidence(prepared), searched=prepared.searched)
        if used:
            pool = _evidence_pool(used, prepared.evidence_hits)
            answer.sources = [_citation(number, hit) for number, hit in enumerate(pool, 1)]
            answer.evidence = on_their_pages(select_evidence(prepared.searched or request.question, pool), pool)
        if used and "don't know" in raw.lower():
            answer.text, answer.answerable, answer.see_also = NOT_ANSWERABLE, False, answer.sources
            if answer.evidence and (prepared.answerability is None or prepared.answerability.answerable):
                _lead_with_evidence(answer)  # the sources hold it (calibrated check) though the decoder says not
        elif used:
            match = quote_source(raw, request.question, [hit.chunk.text for hit in used]) if request.extract else None
            if match is not None:
                # The small model's wording wanders; the source's own words are the answer it was reaching for.
                answer.text = quoted(match)
                answer.citations = [_citation(match.source_index + 1, used[match.source_index], match.text)]
            else:
                cited = sorted({int(n) for n in CITATION.findall(raw) if 1 <= int(n) <= len(used)})
                answer.citations = [sources[n - 1] for n in cited
                                    if (grounded_share(raw, used[n - 1].chunk.text) or 0) >= MIN_GROUNDED_SHARE]
            answer.supported = claims_supported(answer.text, answer.evidence, [hit.chunk.text for hit in used])
            if answer.evidence and (answer.supported is False or evidence_leads(request.question, answer.text,
                                                                               answer.evidence)):
                _lead_with_evidence(answer)
            elif answer.supported is False:
                answer.citations = []  # shown as the decoder's words, never as what a source says
            _with_computed_change(answer, request.question)
        elif not raw:
            answer.text = IDK
        return answer

    def _choose(self, prepared: PreparedAnswer) -> Answer:
        request, prompt, timings = prepared.request, prepared.prompt, prepared.timings
        started = time.perf_counter()
        # Options are scored as the reply would begin ("Yes", not " yes"): see docs/environment.md's tokenisation
        # note.
        options = {choice: choice[:1].upper() + choice[1:] for choice in request.choices}
        logprobs = prepared.generator.option_logprobs(prompt.messages, list(options.values()))
        best = max(request.choices, key=lambda choice: logprobs[options[choice]])
        timings["generate_ms"] = (time.perf_counter() - started) * 1000
        sources = [_citation(number, hit) for number, hit in enumerate(prompt.used_chunks, 1)]
        return Answer(best, sources, request.path.value, {"prompt_tokens": prompt.token_count, "completion_tokens": 0},
                      timings, raw_text=str({choice: round(logprobs[options[choice]], 3) for choice in request.choices}),
                      sources=sources)


def _evidence_pool(used: list[ScoredChunk], ranked: list[ScoredChunk]) -> list[ScoredChunk]:
    """The answer's sources: the prompt's, then the further chunks of the ranking that evidence may quote."""
    held = {hit.chunk.id for hit in used}
    return list(used) + [hit for hit in ranked if hit.chunk.id not in held]


def on_their_pages(evidence: list[Evidence], pool: list[ScoredChunk]) -> list[Evidence]:
    """Each quote of a chunk that spans a page break placed on the page its words stand on, read from the PDF (the
    chunk records only its first and last page); a quote no page of the file holds is dropped, never cited to a
    page that does not show it."""
    placed = []
    for item in evidence:
        chunk = pool[item.number - 1].chunk
        if (chunk.page_end is None or chunk.page is None or not chunk.source.lower().endswith(".pdf")
                or not Path(chunk.source).is_file()):
            placed.append(item)  # one page; or a file no longer there to read (its chunk's first page stands)
        elif (page := page_of_quote(Path(chunk.source), range(chunk.page, chunk.page_end + 1), item.quote)) is not None:
            placed.append(replace(item, page=page))
    return placed


def evidence_leads(question: str, text: str, evidence: list[Evidence]) -> bool:
    """Whether the evidence should be the answer's text rather than the decoder's words: they say nothing the
    question does not ("customers [1]", "[1] [1]"); the question asks for a figure and they hold none while the best
    quote does; or it asks how to do something (the passage or code is the answer, not a phrase). A decoder's
    figure that its evidence holds stays the answer (the evidence is shown beside it)."""
    words = set(terms(CITATION.sub("", text)))
    if not words or words <= set(terms(question)):
        return True
    if asks_how_to(question):
        return True
    return asks_figure(question) and not DIGIT.search(CITATION.sub("", text)) and bool(DIGIT.search(evidence[0].quote))


def claims_supported(text: str, evidence: list[Evidence], cited: list[str]) -> bool | None:
    """Whether every figure and name the text states is in its evidence or its sources' text; None when it states
    none (nothing to check)."""
    claims = [claim for claim in CLAIM.findall(CITATION.sub("", text)) if claim.strip()]
    if not claims:
        return None
    haystack = _normalised(" ".join([*(e.quote + "\n" + e.header for e in evidence), *cited]))
    return all(_normalised(claim) in haystack for claim in claims)


def _normalised(text: str) -> str:
    return " ".join(text.replace(",", "").replace("$", "").lower().split())


def _lead_with_evidence(answer: Answer) -> None:
    """The answer text becomes the best quote and the next ones from the same source (in the source's order: a
    sentence before its code), where they are, cited to that source; the decoder's own words stay in `raw_text`."""
    best = answer.evidence[0]
    shown = sorted([e for e in answer.evidence if e.number == best.number][:EVIDENCE_IN_TEXT], key=lambda e: e.start)
    where = f"{best.source}, p. {best.page}" if best.page is not None else best.source
    answer.text = f"{where}: " + "\n".join(e.readable() for e in shown) + f" [{best.number}]"
    answer.answerable, answer.see_also, answer.supported = True, [], None
    answer.finish_reason = "stop"  # the text is whole quotes, not the decoder's (maybe cut) words in `raw_text`
    answer.citations = [replace(answer.sources[best.number - 1], snippet=best.quote)]


def _with_computed_change(answer: Answer, question: str) -> None:
    """A change between two periods the question names, computed from a quoted row, added to the text with the
    row cited (the decoder does not do arithmetic; the figures and the operation are shown)."""
    for evidence in answer.evidence:
        if line := computed_change(question, evidence):
            answer.text = f"{answer.text}\n{line} [{evidence.number}]"
            if all(citation.number != evidence.number for citation in answer.citations):
                answer.citations.append(replace(answer.sources[evidence.number - 1], snippet=evidence.quote))
            return


def _confidence(prepared: PreparedAnswer) -> float | None:
    return prepared.answerability.confidence if prepared.answerability else None
