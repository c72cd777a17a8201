"""Prompt building: chat messages that fit the decoder's context window, with numbered sources.

    >>> builder = PromptBuilder(tokenizer, context_window=2048, max_new_tokens=64)  # doctest: +SKIP
    >>> prompt = builder.build("How do I disable timeouts?", hits, PromptMode.RAG)  # doctest: +SKIP
    >>> prompt.citations[1] is prompt.used_chunks[0]  # source [1] is the best-ranked chunk kept  # doctest: +SKIP

Token budget. `budget = context_window - max_new_tokens - margin`; `Prompt.token_count` is the length of the
rendered prompt as the decoder will see it (its own chat template, generation header included) and never exceeds
the budget. Chunks are added in rank order (the input order) and the first one that does not fit is dropped
together with everything ranked below it, so the prompt always holds the top-m retrieved chunks and the dropped
ones are exactly the lowest-ranked. (Skipping a large chunk to squeeze in a smaller lower-ranked one would fill
the window a little better, but chunks are made to a common size, and a prompt that mixes ranks makes "what the
model saw" harder to reason about and to evaluate as retrieval@m.) A chunk is never cut, except the top chunk when it
alone is larger than the room left: it is truncated at a token boundary so the model sees at least the best source.
The instructions and the question are never cut: when they alone exceed the budget, `PromptTooLong` is raised.

Layout, tuned for SmolLM2-135M (docs/environment.md): a system message asking for a short phrase copied from the
sources, then `Context:\\n[3] ...\\n\\n[2] ...\\n\\n[1] ...\\n\\nQuestion: ...`. Sources keep their rank numbers, but the
best-ranked one is printed last, nearest the question, where a small model attends best. Few-shot examples are
optional in every mode; they fill what is left after the sources (sources matter more than examples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rag.errors import UserError
from rag.conversation import Turn
from rag.types import Choice, ScoredChunk

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_RAG_SHOTS = DATA_DIR / "rag_shots.json"

RAG_SYSTEM = (
    "Answer with a short phrase copied from the context. No full sentences. "
    "Use only the context and cite the source number, like [1]. "
    "If the context does not contain the answer, say \"I don't know\"."
)
PROMPT_SYSTEM = "Answer the question with a short phrase. No full sentences."
NO_SOURCES = "(no sources found)"


class PromptTooLong(UserError):
    """The instructions and the question alone do not fit in the token budget."""


class PromptMode(Choice, label="prompt mode"):
    RAG = "rag"  # retrieved chunks as numbered sources
    PROMPT_ONLY = "prompt"  # zero-shot, the question alone
    FEW_SHOT = "few-shot"  # question/answer examples as earlier chat turns, no sources


@dataclass(slots=True)
class Prompt:
    messages: list[dict[str, str]]
    used_chunks: list[ScoredChunk]  # source [i] is used_chunks[i - 1]; rank order
    dropped_chunks: list[ScoredChunk]  # did not fit (or the mode takes no sources); rank order
    token_count: int  # rendered with the decoder's chat template, generation header included
    budget: int  # context_window - max_new_tokens - margin
    mode: str = PromptMode.RAG.value  # a PromptMode value, or "choices"
    shots_used: int = 0
    truncated: bool = False  # used_chunks[0] holds only the head of the top chunk's text
    history_used: int = 0  # earlier conversation turns in the prompt: the most recent ones

    @property
    def citations(self) -> dict[int, ScoredChunk]:
        """Source number as printed in the prompt → the chunk behind it."""
        return {number: hit for number, hit in enumerate(self.used_chunks, 1)}


def load_shots(path: str | Path, n: int | None = None) -> list[dict]:
    """Few-shot examples from a JSON list (or {"examples": [...]}) or a JSONL file.

    Each example needs a `question` and an `answer` (or a non-empty `answers` list: the first is used); RAG examples
    also carry `sources`, a list of passage texts the answer cites by their [n]. Returns the first `n` (all if None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Few-shot file not found: '{path}'")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data.get("examples") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of examples or {{\"examples\": [...]}}")
        located = [(f"item {index}", record) for index, record in enumerate(records, 1)]
    except json.JSONDecodeError:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}, line {number}: not JSON ({error.msg})") from None
    shots = [_shot(record, f"{path}, {where}") for where, record in located]
    if not shots:
        raise UserError(f"{path}: no examples")
    return shots if n is None else shots[: max(n, 0)]


def _shot(record: object, where: str) -> dict:
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: an example must be an object with 'question' and 'answer'")
    answer = record.get("answer")
    if answer is None and isinstance(record.get("answers"), list) and record["answers"]:
        answer = record["answers"][0]
        answer = answer.get("text") if isinstance(answer, Mapping) else answer  # SQuAD-style {"text": ...}
    question = record.get("question")
    if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) or not answer.strip():
        raise UserError(f"{where}: an example needs a non-empty 'question' and 'answer'")
    shot = {"question": question.strip(), "answer": answer.strip()}
    sources = record.get("sources")
    if sources is not None:
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise UserError(f"{where}: 'sources' must be a list of strings")
        shot["sources"] = sources
    return shot


def render_plain(messages: Sequence[Mapping[str, str]]) -> str:
    """Fallback rendering for tokenizers without a chat template (base models); generators should use the same."""
    turns = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def _length(encoded: object) -> int:
    """Length of `apply_chat_template(..., tokenize=True)`'s result: transformers 5 returns a BatchEncoding (a
    Mapping with input_ids); older versions a list of ids; with return_tensors a tensor of shape (1, n)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    shape = getattr(encoded, "shape", None)
    if shape is not None:
        return int(shape[-1])
    if len(encoded) and isinstance(encoded[0], (list, tuple)):
        return len(encoded[0])
    return len(encoded)


class PromptBuilder:
    """Builds prompts for one decoder; reusable across questions.

    `tokenizer` is the decoder's (transformers) tokenizer. None (an OpenAI-compatible server with no local
    tokenizer) falls back to an estimate of one token per 3 characters, which overcounts English text.
    `shots` are the examples for FEW_SHOT mode (see `load_shots`); `rag_shots` the number of packaged RAG examples
    (rag/data/rag_shots.json) to put before a RAG question, or the examples themselves. Off by default: few-shot
    turns did not help SmolLM2-135M (docs/environment.md).
    """

    CHARS_PER_TOKEN = 3  # estimate used without a tokenizer

    def __init__(self, tokenizer, context_window: int, max_new_tokens: int, margin: int = 32,
                 shots: list[dict] | None = None, rag_shots: int | list[dict] = 0,
                 rag_system: str = RAG_SYSTEM, prompt_system: str = PROMPT_SYSTEM):
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.max_new_tokens = max_new_tokens
        self.margin = margin
        self.budget = context_window - max_new_tokens - margin
        if self.budget <= 0:
            raise UserError(
                f"No room for a prompt: context window {context_window} - max_new_tokens {max_new_tokens} "
                f"- margin {margin} = {self.budget} tokens."
            )
        self.shots = list(shots or [])
        if isinstance(rag_shots, int):
            rag_shots = load_shots(DEFAULT_RAG_SHOTS, rag_shots) if rag_shots > 0 else []
        self.rag_shots = list(rag_shots)
        self.rag_system = rag_system
        self.prompt_system = prompt_system
        self._has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False

    # ---- token counting -------------------------------------------------------------------------------------
    def count(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Tokens of the rendered prompt, as the decoder will receive it (generation header included)."""
        if self.tokenizer is None:
            return sum(self._estimate(m["content"]) + 4 for m in messages) + 3
        if not self._has_template:
            return len(self.encode(render_plain(messages)))
        return _length(self.tokenizer.apply_chat_template(list(messages), tokenize=True,
                                                          add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return [0] * self._estimate(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _estimate(self, text: str) -> int:
        return math.ceil(len(text) / self.CHARS_PER_TOKEN)

    def _head(self, text: str, tokens: int) -> str:
        """The longest prefix of `text` of at most `tokens` tokens, cut at a token boundary (a substring of text)."""
        if tokens <= 0:
            return ""
        if self.tokenizer is None:
            return text[: tokens * self.CHARS_PER_TOKEN]
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) <= tokens:
                return text
            return text[: offsets[tokens - 1][1]]
        ids = self.encode(text)
        return text if len(ids) <= tokens else self.tokenizer.decode(ids[:tokens])

    # ---- message layout -------------------------------------------------------------------------------------
    @staticmethod
    def source_block(number: int, text: str) -> str:
        return f"[{number}] {text.strip()}"

    @staticmethod
    def context_turn(question: str, blocks: list[str]) -> str:
        """`blocks` in rank order; printed best-ranked last, nearest the question."""
        context = "\n\n".join(reversed(blocks)) if blocks else NO_SOURCES
        return f"Context:\n{context}\n\nQuestion: {question}"

    def _shot_turns(self, shot: dict, with_sources: bool) -> list[dict[str, str]]:
        if with_sources:
            blocks = [self.source_block(n, text) for n, text in enumerate(shot.get("sources", []), 1)]
            user = self.context_turn(shot["question"], blocks)
        else:
            user = shot["question"]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": shot["answer"]}]

    # ---- building -------------------------------------------------------------------------------------------
    def build(self, question: str, chunks: Sequence[ScoredChunk] = (), mode: PromptMode | str = PromptMode.RAG,
              history: Sequence[Turn] = ()) -> Prompt:
        """A prompt for `question`. `chunks` are in rank order (best first); only RAG mode uses them. `history`
        holds the conversation's earlier turns, oldest first; they fill the room the sources leave, the most
        recent first, so the oldest are the ones dropped."""
        mode = PromptMode.parse(mode)
        question = _clean_question(question)
        if mode is PromptMode.RAG:
            return self._fit(mode.value, self.rag_system, question, list(chunks), self.rag_shots, True, history)
        if mode is PromptMode.FEW_SHOT and not self.shots:
            raise UserError("Few-shot mode needs examples: pass shots=load_shots(path, n) to PromptBuilder.")
        shots = self.shots if mode is PromptMode.FEW_SHOT else []
        prompt = self._fit(mode.value, self.prompt_system, question, [], shots, False, history)
        prompt.dropped_chunks = list(chunks)  # this mode takes no sources
        return prompt

    def for_choices(self, question: str, chunks: Sequence[ScoredChunk], choices: Sequence[str]) -> Prompt:
        """A prompt for a closed-set question (e.g. yes/no/maybe); the generator scores the options."""
        if len(choices) < 2:
            raise UserError("A closed-set question needs at least two choices.")
        question = _clean_question(question)
        options = [choice[:1].upper() + choice[1:] for choice in choices]
        system = f"Answer with one word: {', '.join(options[:-1])} or {options[-1]}."
        if chunks:
            system = "Use only the context. " + system
        return self._fit("choices", system, question, list(chunks), [], bool(chunks))

    def _fit(self, mode: str, system: str, question: str, chunks: list[ScoredChunk], shots: list[dict],
             with_sources: bool, history: Sequence[Turn] = ()) -> Prompt:
        turns = 0  # of `history`, counted from its end

        def render(hits: list[ScoredChunk], shot_count: int = 0) -> list[dict[str, str]]:
            messages = [{"role": "system", "content": system}]
            for shot in shots[:shot_count]:
                messages += self._shot_turns(shot, with_sources)
            for turn in history[len(history) - turns:] if turns else ():
                messages += [{"role": "user", "content": turn.question},
                             {"role": "assistant", "content": turn.answer}]
            if with_sources:
                blocks = [self.source_block(n, hit.chunk.text) for n, hit in enumerate(hits, 1)]
                user = self.context_turn(question, blocks)
            else:
                user = question
            return messages + [{"role": "user", "content": user}]

        base = self.count(render([]))
        if base > self.budget:
            raise PromptTooLong(
                f"The instructions and question take {base} tokens, more than the prompt budget of {self.budget} "
                f"(context window {self.context_window} - max_new_tokens {self.max_new_tokens} - margin "
                f"{self.margin}). Shorten the question, lower max_new_tokens or use a larger context window."
            )
        used, count, truncated = [], base, False
        if chunks:
            used, count, truncated = self._fit_chunks(render, chunks, base)
        while turns < len(history):  # earlier turns fill what the sources left, the most recent first
            turns += 1
            trial = self.count(render(used))
            if trial > self.budget:
                turns -= 1
                break
            count = trial
        shot_count = 0
        while shot_count < len(shots):  # examples fill what the sources left, in file order
            trial = self.count(render(used, shot_count + 1))
            if trial > self.budget:
                break
            shot_count, count = shot_count + 1, trial
        return Prompt(render(used, shot_count), used, chunks[len(used):], count, self.budget, mode, shot_count,
                      truncated, turns)

    def _fit_chunks(self, render, chunks: list[ScoredChunk], base: int) -> tuple[list[ScoredChunk], int, bool]:
        # Estimate from each block's own token count (each chunk tokenised once, only as far as the budget goes),
        # then correct with the real template, which costs a few renders instead of one per chunk.
        room, k = self.budget - base, 0
        separator = len(self.encode("\n\n"))
        for number, hit in enumerate(chunks, 1):
            cost = len(self.encode(self.source_block(number, hit.chunk.text))) + separator
            if cost > room:
                break
            room, k = room - cost, k + 1
        count = self.count(render(chunks[:k])) if k else base
        while k and count > self.budget:
            k -= 1
            count = self.count(render(chunks[:k])) if k else base
        while k < len(chunks):
            trial = self.count(render(chunks[: k + 1]))
            if trial > self.budget:
                break
            k, count = k + 1, trial
        if k:
            return list(chunks[:k]), count, False
        return self._truncate_top(render, chunks[0], base)

    def _truncate_top(self, render, top: ScoredChunk, base: int) -> tuple[list[ScoredChunk], int, bool]:
        """The best chunk alone is too large: keep the head of its text that fits (at least a few tokens)."""
        empty = replace(top, chunk=replace(top.chunk, text=""))
        room = self.budget - self.count(render([empty]))
        for _ in range(8):
            if room < 8:  # not enough left to show a meaningful piece of the source
                break
            head = replace(top, chunk=replace(top.chunk, text=self._head(top.chunk.text, room)))
            count = self.count(render([head]))
            if count <= self.budget:
                return [head], count, True
            room -= count - self.budget
        return [], base, False


def _clean_question(question: str) -> str:
    if not question or not question.strip():
        raise UserError("The question is empty.")
    return question.strip()
