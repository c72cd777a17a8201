"""Prompt building against the real decoder tokenizer and chat template (SmolLM2-135M, loaded once per session)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from rag import offline  # noqa: F401
from rag.prompt import (
    DEFAULT_RAG_SHOTS,
    Prompt,
    PromptBuilder,
    PromptMode,
    PromptTooLong,
    _length,
    load_shots,
)
from rag.types import Chunk, ScoredChunk

WORDS = ("river bank ledger turbine quorum lattice harbor gradient falcon meadow cipher velvet archive beacon "
         "Tokyo 1889 voltage protocol sediment orbit").split()


@pytest.fixture(scope="session")
def decoder_tokenizer():
    from transformers import AutoTokenizer

    from rag.models import default_decoder_path

    path = default_decoder_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hits(n: int, words: int = 120, seed: int = 0) -> list[ScoredChunk]:
    rng = random.Random(seed)
    out = []
    for rank in range(1, n + 1):
        text = f"Passage {rank}. " + " ".join(rng.choice(WORDS) for _ in range(words + rng.randint(0, words // 2)))
        chunk = Chunk(doc_id=f"doc{rank % 7}", ordinal=rank, text=text, source=f"docs/file{rank % 7}.md", id=rank)
        out.append(ScoredChunk(chunk, 1.0 / rank, rank, "hybrid"))
    return out


def real_count(tokenizer, prompt: Prompt) -> int:
    ids = tokenizer.apply_chat_template(prompt.messages, tokenize=True, add_generation_prompt=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def user_turn(prompt: Prompt) -> str:
    assert prompt.messages[-1]["role"] == "user"
    return prompt.messages[-1]["content"]


@pytest.mark.parametrize("window", [300, 700, 1500, 4096])
def test_budget_never_exceeded_on_many_long_chunks(decoder_tokenizer, window):
    chunks = hits(200, words=150, seed=window)
    builder = PromptBuilder(decoder_tokenizer, context_window=window, max_new_tokens=64, margin=16)
    prompt = builder.build("Which passage mentions the harbor turbine?", chunks, PromptMode.RAG)
    assert prompt.budget == window - 64 - 16
    assert prompt.token_count == real_count(decoder_tokenizer, prompt)
    assert prompt.token_count <= prompt.budget
    assert len(prompt.used_chunks) + len(prompt.dropped_chunks) == 200 - 0
    assert prompt.used_chunks  # the best source always gets in, whole or truncated


def test_lowest_ranked_dropped_and_the_next_one_would_not_fit(decoder_tokenizer):
    chunks = hits(40, words=60, seed=3)
    builder = PromptBuilder(decoder_tokenizer, context_window=1200, max_new_tokens=48)
    prompt = builder.build("What does passage 2 say?", chunks, "rag")
    k = len(prompt.used_chunks)
    assert 1 < k < 40 and not prompt.truncated
    assert prompt.used_chunks == chunks[:k]  # a rank prefix, untouched
    assert prompt.dropped_chunks == chunks[k:]  # exactly the lowest-ranked
    one_more = builder.build("What does passage 2 say?", chunks[: k + 1], "rag")  # the fill is maximal
    assert len(one_more.used_chunks) == k


def test_sources_are_numbered_by_rank_and_printed_best_last(decoder_tokenizer):
    chunks = hits(4, words=20)
    prompt = PromptBuilder(decoder_tokenizer, 4096, 64).build("What is in passage 1?", chunks, PromptMode.RAG)
    text = user_turn(prompt)
    assert prompt.used_chunks == chunks and not prompt.dropped_chunks
    for number, hit in prompt.citations.items():
        assert prompt.used_chunks[number - 1] is hit
        assert f"[{number}] {hit.chunk.text}" in text
    positions = [text.index(f"[{n}] ") for n in (4, 3, 2, 1)]
    assert positions == sorted(positions)  # [1], the best, sits nearest the question
    assert text.startswith("Context:\n") and text.endswith("\n\nQuestion: What is in passage 1?")
    system = prompt.messages[0]["content"]
    assert prompt.messages[0]["role"] == "system"
    assert "short phrase" in system and "[1]" in system and "I don't know" in system


def test_question_is_never_cut(decoder_tokenizer):
    question = "Considering every detail, " + " ".join(WORDS * 6) + " — which passage is it?"
    builder = PromptBuilder(decoder_tokenizer, context_window=520, max_new_tokens=64)
    prompt = builder.build(question, hits(30, words=100), PromptMode.RAG)
    assert user_turn(prompt).endswith(f"Question: {question}")
    assert prompt.token_count == real_count(decoder_tokenizer, prompt) <= prompt.budget


def test_question_too_long_raises(decoder_tokenizer):
    builder = PromptBuilder(decoder_tokenizer, context_window=256, max_new_tokens=64)
    with pytest.raises(PromptTooLong, match="budget of 160"):
        builder.build("Why " + "really " * 300 + "?", hits(3), PromptMode.RAG)
    with pytest.raises(PromptTooLong):
        builder.build("Why " + "really " * 300 + "?", [], PromptMode.PROMPT_ONLY)


def test_oversized_top_chunk_is_truncated_not_dropped(decoder_tokenizer):
    chunks = hits(5, words=900)
    builder = PromptBuilder(decoder_tokenizer, context_window=400, max_new_tokens=64)
    prompt = builder.build("What does the first passage start with?", chunks, PromptMode.RAG)
    assert prompt.truncated and len(prompt.used_chunks) == 1
    head = prompt.used_chunks[0]
    assert head.chunk.id == chunks[0].chunk.id and head.rank == 1
    assert chunks[0].chunk.text.startswith(head.chunk.text) and len(head.chunk.text) > 100
    assert prompt.dropped_chunks == chunks[1:]
    assert prompt.token_count == real_count(decoder_tokenizer, prompt) <= prompt.budget
    assert prompt.budget - prompt.token_count < 8  # filled to the brim


def test_no_chunks_gives_a_sourceless_rag_prompt(decoder_tokenizer):
    prompt = PromptBuilder(decoder_tokenizer, 2048, 64).build("Who wrote it?", [], PromptMode.RAG)
    assert prompt.used_chunks == [] and "(no sources found)" in user_turn(prompt)


def test_prompt_only_zero_shot(decoder_tokenizer):
    chunks = hits(2)
    prompt = PromptBuilder(decoder_tokenizer, 2048, 64).build("What is the capital of Peru?", chunks, "prompt")
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert prompt.messages[1]["content"] == "What is the capital of Peru?"
    assert prompt.used_chunks == [] and prompt.dropped_chunks == chunks
    assert prompt.token_count == real_count(decoder_tokenizer, prompt)


def test_few_shot_turns_alternate_and_fill_the_budget(decoder_tokenizer, tmp_path: Path):
    path = tmp_path / "shots.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"Question number {i}?", "answer": f"answer {i}"})
                              for i in range(50)) + "\n")
    shots = load_shots(path, 5)
    prompt = PromptBuilder(decoder_tokenizer, 2048, 64, shots=shots).build("Final question?", [], "few-shot")
    roles = [m["role"] for m in prompt.messages]
    assert roles == ["system"] + ["user", "assistant"] * 5 + ["user"]
    assert prompt.messages[1]["content"] == "Question number 0?" and prompt.messages[2]["content"] == "answer 0"
    assert prompt.shots_used == 5 and prompt.messages[-1]["content"] == "Final question?"

    tight = PromptBuilder(decoder_tokenizer, 200, 64, shots=load_shots(path)).build("Final question?", [], "few-shot")
    assert 0 < tight.shots_used < 50  # examples are dropped, never the question
    assert tight.token_count == real_count(decoder_tokenizer, tight) <= tight.budget


def test_few_shot_mode_needs_shots(decoder_tokenizer):
    with pytest.raises(ValueError, match="load_shots"):
        PromptBuilder(decoder_tokenizer, 2048, 64).build("Q?", [], PromptMode.FEW_SHOT)


def test_rag_shots_are_switchable(decoder_tokenizer):
    chunks = hits(2, words=20)
    plain = PromptBuilder(decoder_tokenizer, 4096, 64).build("What is in passage 1?", chunks, "rag")
    assert plain.shots_used == 0 and len(plain.messages) == 2
    shot = PromptBuilder(decoder_tokenizer, 4096, 64, rag_shots=2).build("What is in passage 1?", chunks, "rag")
    assert shot.shots_used == 2
    assert [m["role"] for m in shot.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert shot.messages[1]["content"].startswith("Context:\n[2] ") and "\n\n[1] " in shot.messages[1]["content"]
    assert shot.messages[2]["content"] == "1889 [1]"
    assert shot.used_chunks == chunks  # sources come before examples
    assert shot.token_count == real_count(decoder_tokenizer, shot)


def test_packaged_rag_shots_are_well_formed():
    shots = load_shots(DEFAULT_RAG_SHOTS)
    assert 2 <= len(shots) <= 4
    for shot in shots:
        assert shot["sources"] and shot["question"].endswith("?")
        cited = [int(n) for n in re.findall(r"\[(\d+)\]", shot["answer"])]
        assert all(1 <= n <= len(shot["sources"]) for n in cited)
        if cited:  # the answer is a span copied from the cited source
            span = shot["answer"].rsplit(" [", 1)[0]
            assert span.lower() in shot["sources"][cited[0] - 1].lower()


def test_for_choices(decoder_tokenizer):
    builder = PromptBuilder(decoder_tokenizer, 2048, 8)
    prompt = builder.for_choices("Does aspirin thin blood?", hits(2, words=30), ["yes", "no", "maybe"])
    assert prompt.mode == "choices"
    assert prompt.messages[0]["content"].endswith("Answer with one word: Yes, No or Maybe.")
    assert "[1] Passage 1." in user_turn(prompt) and len(prompt.used_chunks) == 2
    bare = builder.for_choices("Does aspirin thin blood?", [], ["yes", "no"])
    assert bare.messages[-1]["content"] == "Does aspirin thin blood?"
    assert bare.messages[0]["content"] == "Answer with one word: Yes or No."
    with pytest.raises(ValueError):
        builder.for_choices("Q?", [], ["yes"])


def test_load_shots_formats_and_errors(tmp_path: Path):
    listed = tmp_path / "shots.json"
    listed.write_text(json.dumps([{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answers": ["A2", "B"]},
                                  {"question": "Q3?", "answers": [{"text": "A3"}]}]))
    assert load_shots(listed) == [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"},
                                  {"question": "Q3?", "answer": "A3"}]
    assert len(load_shots(listed, 2)) == 2 and load_shots(listed, 0) == []
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"examples": [{"question": "Q?", "answer": "A", "sources": ["S"]}]}))
    assert load_shots(wrapped)[0]["sources"] == ["S"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q?"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_shots(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q?", "answer": "A"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        load_shots(broken)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_shots(tmp_path / "missing.json")


def test_mode_parsing_lists_valid_values():
    assert PromptMode.parse("few-shot") is PromptMode.FEW_SHOT and PromptMode.parse(PromptMode.RAG) is PromptMode.RAG
    with pytest.raises(ValueError, match=r"'rag', 'prompt', 'few-shot'"):
        PromptMode.parse("zero")


def test_invalid_budget_and_empty_question(decoder_tokenizer):
    with pytest.raises(ValueError, match="No room"):
        PromptBuilder(decoder_tokenizer, context_window=100, max_new_tokens=80, margin=32)
    with pytest.raises(ValueError, match="empty"):
        PromptBuilder(decoder_tokenizer, 2048, 64).build("   ", [], "prompt")


def test_without_a_tokenizer_estimates_conservatively(decoder_tokenizer):
    chunks = hits(50, words=80)
    prompt = PromptBuilder(None, 1024, 64).build("Which passage?", chunks, "rag")
    assert 0 < len(prompt.used_chunks) < 50 and prompt.token_count <= prompt.budget
    assert real_count(decoder_tokenizer, prompt) <= prompt.budget  # 3 chars/token overcounts real text


def test_template_result_lengths():
    class Encoding(dict):
        pass

    class Tensor:
        shape = (1, 7)

    assert _length([1, 2, 3]) == 3
    assert _length(Encoding(input_ids=[1, 2])) == 2
    assert _length([[1, 2, 3, 4]]) == 4
    assert _length(Tensor()) == 7
