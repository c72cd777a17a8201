"""The `openai` backend against the real serving engine: vLLM started by scripts/engine.sh (fp32, eager) serving
the packaged SmolLM2-135M, and the packaged LoRA adapter as a served adapter. The contract the pipeline relies on:
the same greedy text as the in-process decoder, streaming with token counts, stop sequences, closed-set scoring
from logprobs, prompts budgeted to the served context length, and failures mapped to the library's errors.

One server for the module, short generations. The engine's venv is created when missing (pip, ~680 MB); without a
reachable package index the tests skip and say so.
"""

from __future__ import annotations

import copy
import socket

import pytest

from rag.config import PACKAGED_ADAPTER
from rag.errors import UserError
from rag.generation import GenerationParams, GeneratorUnavailable, OpenAIGenerator, TransformersGenerator
from rag.prompt import PromptBuilder
from rag.types import Chunk, ScoredChunk
from tests.conftest import free_port
from tests.engine import EngineUnavailable, running_engine

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MAX_MODEL_LEN = 1024  # small, so that an over-long prompt is cheap to make and `-k 30` must be cut to fit
QUESTION = [{"role": "user", "content": "Name three colours."}]
YES_NO = [{"role": "system", "content": "Answer with yes, no or maybe."},
          {"role": "user", "content": "Is the sky blue on a clear day?"}]
# Both sides decode in fp32 but with different kernels (vLLM's CPU attention and GEMMs against torch's), which only
# reorders float sums: log-probabilities measured 1.5e-5 apart. 1e-3 leaves room for other CPUs while a bf16
# server (8 significant bits, errors of 1e-2 and more after 30 layers) fails it.
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The /v1 URL of one vLLM server for the module: the base model as "default", the adapter as "adapter"."""
    log = tmp_path_factory.mktemp("engine") / "vllm.log"
    try:
        with running_engine(free_port(), log, MAX_MODEL_LEN, lora=PACKAGED_ADAPTER) as base_url:
            yield base_url
    except EngineUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def remote(engine):
    return OpenAIGenerator(engine, "default", timeout=120, max_retries=0)


def test_greedy_text_equals_the_in_process_decoder(remote, generator):
    params = GenerationParams(max_new_tokens=24)
    served, local = remote.generate(QUESTION, params), generator.generate(QUESTION, params)
    assert (served.text, served.tokens_in, served.tokens_out, served.finish_reason) == (
        local.text, local.tokens_in, local.tokens_out, local.finish_reason)


def test_the_served_lora_adapter_answers_like_the_merged_one_in_process(engine, generator):
    params = GenerationParams(max_new_tokens=16)
    tuned = TransformersGenerator.from_loaded(copy.deepcopy(generator.model), generator.tokenizer, "cpu",
                                              generator.model_name, adapter_dir=PACKAGED_ADAPTER)
    served = OpenAIGenerator(engine, PACKAGED_ADAPTER.name, timeout=120, max_retries=0).generate(QUESTION, params)
    assert served.text == tuned.generate(QUESTION, params).text
    assert served.text != generator.generate(QUESTION, params).text  # the adapter was applied at all


def test_streaming_joins_to_the_text_and_reports_usage(remote):
    params = GenerationParams(max_new_tokens=16)
    whole = remote.generate(QUESTION, params)
    with remote.stream(QUESTION, params) as stream:
        pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert (stream.generation.tokens_in, stream.generation.tokens_out, stream.generation.finish_reason) == (
        whole.tokens_in, whole.tokens_out, whole.finish_reason)


def test_stop_sequences_cut_the_reply_as_in_process(remote, generator):
    unstopped = generator.generate(QUESTION, GenerationParams(max_new_tokens=24)).text
    word = unstopped.split()[2]  # a word the reply reaches, past its start
    params = GenerationParams(max_new_tokens=24, stop=[word])
    served, local = remote.generate(QUESTION, params), generator.generate(QUESTION, params)
    assert served.text == local.text == unstopped[:unstopped.index(word)]
    assert served.finish_reason == "stop"


def test_choices_are_scored_from_the_servers_logprobs(remote, generator):
    options = ["Yes", "No", "Maybe"]
    served, local = remote.option_logprobs(YES_NO, options), generator.option_logprobs(YES_NO, options)
    top20 = dict(generator.top_next_tokens(YES_NO, 20))
    for option in options:  # exact among the server's top 20, the 20th's log-probability (an upper bound) below
        expected = local[option] if option in top20 else min(top20.values())
        assert served[option] == pytest.approx(expected, abs=LOGPROB_TOLERANCE)


def test_prompts_are_budgeted_to_the_served_context_length(remote):
    assert remote.context_window == MAX_MODEL_LEN  # from /v1/models, not the 8192 default
    passage = "The release train leaves every second Tuesday from platform nine. " * 12
    hits = [ScoredChunk(Chunk(f"doc{n}", 0, passage, f"doc{n}.txt"), 1.0 / n, n, "dense") for n in range(1, 31)]
    params = GenerationParams(max_new_tokens=8)
    prompt = PromptBuilder(remote.tokenizer, remote.context_window, params.max_new_tokens).build(
        "When does the release train leave?", hits)
    assert prompt.dropped_chunks and prompt.token_count <= MAX_MODEL_LEN - params.max_new_tokens
    assert remote.generate(prompt.messages, params).tokens_in == prompt.token_count  # accepted, counted alike


def test_an_over_long_prompt_is_a_user_error(remote):
    messages = [{"role": "user", "content": "colour " * (2 * MAX_MODEL_LEN)}]
    with pytest.raises(UserError, match="refused the request \\(400\\)") as raised:
        remote.generate(messages, GenerationParams(max_new_tokens=4))
    assert raised.value.code == "validation_error"


def test_an_unknown_model_is_unavailable_and_named(engine):
    unknown = OpenAIGenerator(engine, "no-such-model", timeout=30, max_retries=0)
    with pytest.raises(GeneratorUnavailable, match="404 for model 'no-such-model'") as raised:
        unknown.generate(QUESTION, GenerationParams(max_new_tokens=2))
    assert raised.value.code == "generator_unavailable"
    assert unknown.context_window == 8192  # not listed: the default until the server says otherwise


def test_an_unreachable_server_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    gone = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", "default", timeout=5, max_retries=0)
    with pytest.raises(GeneratorUnavailable, match="is unreachable") as raised:
        gone.generate(QUESTION, GenerationParams(max_new_tokens=2))
    with pytest.raises(GeneratorUnavailable, match="is unreachable"):
        gone.context_window  # noqa: B018 (asked of the server)
    assert raised.value.code == "generator_unavailable"
