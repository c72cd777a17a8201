"""The answer pipeline end to end on the shipped corpus: citations point at real chunks, paths behave."""

import pytest

from ingest.job import IngestJob
from rag.config import Settings
from rag.generation import GenerationParams, NoAdapterConfigured
from rag.pipeline import AnswerPath, Pipeline
from rag.store import IndexNotFoundError, Store
from rag.types import ALL_COLLECTIONS
from tests.conftest import CORPUS

pytestmark = pytest.mark.slow
FAST = GenerationParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, embedder, generator):
    index = tmp_path_factory.mktemp("pipeline") / "index"
    # The base model's paths: the shipped adapter and the default path have their own tests (test_answers.py).
    settings = Settings(index_dir=index, parse_workers=1, packaged_adapter=False)
    job = IngestJob(settings, embedder)
    for name in ("timeouts.md", "proxies.md", "resource-limits.md"):
        job.run(CORPUS / "httpx" / "advanced" / name, prune=False)
    from rag.retrieve import Retriever

    return Pipeline(settings, Retriever(Store.open(index, embedder.name), embedder), generator)


def test_rag_answer_cites_real_chunks(pipeline):
    answer = pipeline.answer("How long does HTTPX wait before raising a TimeoutException?", params=FAST)
    assert answer.path == "rag" and answer.text
    assert answer.citations, answer
    store = pipeline.retriever.store
    # The words the 135M model picks vary with the CPU's float kernels; the context it is given does not.
    assert "5 seconds" in store.get([answer.sources[0].chunk_id], collection=ALL_COLLECTIONS)[0].text
    for citation in answer.citations + answer.sources:
        (chunk,) = store.get([citation.chunk_id], collection=ALL_COLLECTIONS)
        assert chunk.name == citation.source and citation.number >= 1  # a name, not a server path
    cited = answer.citations[0]
    assert cited.snippet in store.get([cited.chunk_id], collection=ALL_COLLECTIONS)[0].text  # an aligned answer quotes its source exactly
    assert {"retrieve_ms", "prompt_ms", "generate_ms", "tokens_per_second"} <= set(answer.timings)
    assert answer.usage["prompt_tokens"] > 50 and answer.usage["completion_tokens"] >= 1


def test_prompt_only_path_retrieves_nothing(pipeline):
    answer = pipeline.answer("What is HTTPX?", path="prompt", params=FAST)
    assert answer.path == "prompt" and answer.sources == [] and answer.citations == []
    assert "retrieve_ms" not in answer.timings


def test_streaming_ends_with_the_same_answer(pipeline):
    question = "Which environment variable sets the proxy for HTTPS requests?"
    pieces = list(pipeline.stream(question, params=FAST))
    final = pieces[-1]
    assert all(isinstance(piece, str) for piece in pieces[:-1])
    assert "".join(pieces[:-1]).strip() == final.raw_text
    assert final.text == pipeline.answer(question, params=FAST).text


def test_choices_are_scored_not_generated(pipeline):
    answer = pipeline.answer("Does HTTPX enforce timeouts by default?", choices=["yes", "no"])
    assert answer.text in ("yes", "no") and answer.usage["completion_tokens"] == 0


def test_finetuned_path_without_adapter_is_a_clear_error(pipeline):
    with pytest.raises(NoAdapterConfigured, match="no adapter configured"):
        pipeline.answer("anything", path=AnswerPath.FINETUNED)


def test_unknown_path_and_empty_question_are_rejected(pipeline):
    with pytest.raises(ValueError, match=r"Unknown path 'magic'. Supported: \['prompt', 'rag'"):
        pipeline.answer("question", path="magic")
    with pytest.raises(ValueError, match="empty"):
        pipeline.answer("   ")


def test_missing_index_is_a_clear_error(tmp_path, generator):
    with pytest.raises(IndexNotFoundError, match="rag ingest"):
        Pipeline(Settings(index_dir=tmp_path / "none"), generator=generator).answer("anything", params=FAST)
