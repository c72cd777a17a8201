"""Answers a user can trust: the default path, "not answerable" when the sources don't say, follow-up questions."""

from __future__ import annotations

import pytest

from ingest.job import IngestJob
from rag.answerability import AnswerabilityModel, coverage
from rag.config import PACKAGED_ADAPTER, Settings
from rag.conversation import Turn, is_follow_up, standalone_question
from rag.generation import Generation, GenerationParams
from rag.pipeline import NOT_ANSWERABLE, AnswerRequest, Pipeline
from rag.prompt import PromptBuilder, PromptMode
from rag.retrieve import Retriever
from rag.store import Store
from rag.types import AnswerPath
from tests.conftest import CORPUS

FAST = GenerationParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, embedder, generator):
    index = tmp_path_factory.mktemp("answers") / "index"
    settings = Settings(index_dir=index, parse_workers=1, packaged_adapter=False)
    IngestJob(settings, embedder).run(CORPUS / "httpx" / "advanced")
    return Pipeline(settings, Retriever(Store.open(index, embedder.name), embedder), generator)


# ------------------------------------------------------------------------------------------------- default path
def test_default_path_is_finetuned_rag_only_with_an_adapter_for_the_decoder(tmp_path):
    assert Settings(packaged_adapter=False).default_path is AnswerPath.RAG
    assert Settings(answer_path="prompt").default_path is AnswerPath.PROMPT
    # Any decoder but the packaged one: the shipped adapter does not apply.
    served = Settings(backend="openai")
    assert served.adapter is None and served.default_path is AnswerPath.RAG
    local = Settings(decoder_model=str(tmp_path))
    assert local.adapter is None and local.default_path is AnswerPath.RAG
    explicit = Settings(decoder_model=str(tmp_path), adapter_dir=tmp_path)
    assert explicit.adapter == tmp_path and explicit.default_path is AnswerPath.FINETUNED_RAG
    with pytest.raises(ValueError, match="Unknown path 'best'"):
        Settings(answer_path="best")


@pytest.mark.skipif(not (PACKAGED_ADAPTER / "adapter_config.json").is_file(), reason="no adapter shipped")
def test_shipped_adapter_is_the_default_and_matches_its_record():
    import json

    from rag.models import decoder_identity, sha256_files

    settings = Settings(packaged_adapter=True)
    assert settings.adapter == PACKAGED_ADAPTER and settings.default_path is AnswerPath.FINETUNED_RAG
    record = json.loads((PACKAGED_ADAPTER / "training.json").read_text())
    assert record["base_model"]["sha256"] == decoder_identity(None)["sha256"]
    assert record["adapter_sha256"] == sha256_files(PACKAGED_ADAPTER / "adapter_model.safetensors")
    assert (PACKAGED_ADAPTER / "adapter_model.safetensors").stat().st_size <= 10 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------- abstention
def test_coverage_counts_the_questions_content_words():
    assert coverage("Who won Super Bowl 50?", "Super Bowl 50 was won by the Denver Broncos.") == 1.0
    assert coverage("Who won Super Bowl 50?", "Timeouts default to five seconds.") == 0.0


def test_a_question_the_sources_do_not_answer_is_not_answerable(pipeline):
    answer = pipeline.answer("Which team won Super Bowl 50 at Levi's Stadium?", path="rag", params=FAST)
    assert not answer.answerable and answer.text == NOT_ANSWERABLE
    assert answer.citations == [] and answer.see_also and answer.confidence < 0.5
    assert answer.usage["completion_tokens"] == 0  # the decoder did not run


def test_an_answerable_question_is_answered_with_a_citation(pipeline):
    answer = pipeline.answer("How long does HTTPX wait before raising a TimeoutException?", path="rag",
                             params=FAST)
    assert answer.answerable and answer.confidence > 0.5 and answer.see_also == []


def test_a_source_is_never_cited_for_words_it_does_not_contain(pipeline):
    prepared = pipeline.prepare(AnswerRequest("How long does HTTPX wait before raising a TimeoutException?", "rag",
                                              extract=False))
    unsupported = Generation("Bananas ripen in purple moonlight [1]", 10, 8, 0.1)
    assert pipeline.finish(prepared, unsupported).citations == []
    chunk_text = prepared.prompt.used_chunks[0].chunk.text
    supported = Generation(" ".join(chunk_text.split()[:12]) + " [1]", 10, 8, 0.1)
    assert [c.number for c in pipeline.finish(prepared, supported).citations] == [1]


# ------------------------------------------------------------------------------------------------------ evidence
def _evidence_reproduces_its_quote(answer) -> None:
    assert answer.evidence
    for evidence in answer.evidence:
        source = answer.sources[evidence.number - 1]
        chunk = next(hit.chunk for hit in _ranked(answer) if hit.chunk.id == source.chunk_id)
        assert chunk.text[evidence.start:evidence.end] == evidence.quote and evidence.page == chunk.page


def _ranked(answer):
    return _ranked.prepared.evidence_hits


@pytest.mark.parametrize("decoder_says", ["automatically [1]", "[1] [1]", "I don't know."])
def test_a_how_to_answer_shows_the_passage_or_code_that_answers_it(pipeline, decoder_says):
    question = "How do I set a timeout on a client?"
    prepared = _ranked.prepared = pipeline.prepare(AnswerRequest(question, "rag"))
    answer = pipeline.finish(prepared, Generation(decoder_says, 10, 4, 0.1))
    assert answer.answerable and answer.raw_text == decoder_says
    assert "timeout" in answer.text.lower() and answer.text != decoder_says
    assert answer.citations and all(c.snippet in answer.text or c.snippet.strip() in answer.text
                                    for c in answer.citations)
    _evidence_reproduces_its_quote(answer)
    assert answer.to_dict()["evidence"][0]["readable"]


def test_a_figure_the_sources_do_not_hold_is_never_cited(pipeline):
    prepared = _ranked.prepared = pipeline.prepare(
        AnswerRequest("How long does HTTPX wait before raising a TimeoutException?", "rag", extract=False))
    answer = pipeline.finish(prepared, Generation("It waits 4711 seconds [1]", 10, 8, 0.1))
    assert "4711" not in answer.text and "4711" in answer.raw_text  # the evidence leads instead
    assert all("4711" not in citation.snippet for citation in answer.citations)
    _evidence_reproduces_its_quote(answer)


def test_threshold_setting_decides():
    model = AnswerabilityModel({"similarity": 1.0, "coverage": 0.0}, bias=0.0, threshold=0.5)
    features = {"similarity": 0.0, "coverage": 0.0}  # confidence 0.5
    assert model.assess(features).answerable and not model.assess(features, threshold=0.6).answerable


# ----------------------------------------------------------------------------------------------------- follow-ups
@pytest.mark.parametrize("question, follows", [
    ("And for async clients?", True), ("What about proxies?", True), ("How do I disable it?", True),
    ("Why?", True), ("How do I set a timeout on a client?", False), ("What is HTTP/2?", False)])
def test_follow_up_detection(question, follows):
    assert is_follow_up(question) is follows


def test_follow_up_is_searched_with_the_previous_question():
    history = [Turn("How do I set a timeout on a client?", "timeout=5.0 [1]")]
    assert standalone_question(history, "And for async clients?") == \
        "How do I set a timeout on a client? And for async clients?"
    assert standalone_question([], "And for async clients?") == "And for async clients?"


def test_follow_up_retrieves_with_the_conversation(pipeline):
    first = pipeline.answer("How do I configure proxies for HTTPX?", path="rag", params=FAST)
    follow = pipeline.prepare(AnswerRequest("And how do I disable them for some hosts?", "rag",
                                            history=(Turn("How do I configure proxies for HTTPX?", first.text),)))
    assert follow.searched.startswith("How do I configure proxies")
    assert "proxies" in follow.prompt.used_chunks[0].chunk.source
    assert follow.prompt.history_used == 1


def test_history_over_the_budget_is_trimmed_oldest_first(generator):
    builder = PromptBuilder(generator.tokenizer, context_window=400, max_new_tokens=32)
    history = [Turn(f"Question number {i} about " + "timeouts " * 20, f"Answer {i}") for i in range(10)]
    prompt = builder.build("What is the default timeout?", [], PromptMode.PROMPT_ONLY, history)
    assert 0 < prompt.history_used < len(history) and prompt.token_count <= prompt.budget
    kept = [m["content"] for m in prompt.messages if m["role"] == "assistant"]
    assert kept == [f"Answer {i}" for i in range(10 - prompt.history_used, 10)]  # the most recent turns


def test_openai_route_turns_messages_into_history():
    from api.routes.openai_compat import conversation_turns
    from api.schemas import ChatMessage

    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="q1"),
                ChatMessage(role="assistant", content="a1"), ChatMessage(role="user", content="q2")]
    assert conversation_turns(messages) == (Turn("q1", "a1"),)
