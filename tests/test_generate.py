"""The local decoder backend: every inference parameter reaches the model; streaming equals generation."""

import pytest

from rag.config import Settings
from rag.generate import GenerationParams, NoAdapterConfigured, require_adapter
from rag.models import ModelNotFoundError

QUESTION = [{"role": "user", "content": "Name three colours."}]


def test_greedy_generation_is_deterministic_and_counts_tokens(generator):
    first = generator.generate(QUESTION, GenerationParams(max_new_tokens=12))
    again = generator.generate(QUESTION, GenerationParams(max_new_tokens=12))
    assert first.text == again.text and first.text.strip()
    assert first.tokens_in > 5 and 1 <= first.tokens_out <= 12 and first.seconds > 0


def test_max_new_tokens_bounds_the_output(generator):
    result = generator.generate([{"role": "user", "content": "Write a long story about a dragon."}],
                                GenerationParams(max_new_tokens=5))
    assert result.tokens_out == 5 and result.finish_reason == "length"


def test_stop_sequence_cuts_the_output(generator):
    free = generator.generate(QUESTION, GenerationParams(max_new_tokens=16)).text
    assert "," in free
    stopped = generator.generate(QUESTION, GenerationParams(max_new_tokens=16, stop=[","]))
    assert stopped.text == free[: free.index(",")] and stopped.finish_reason == "stop"


def test_seed_makes_sampling_reproducible_and_sampling_params_reach_the_model(generator, monkeypatch):
    params = GenerationParams(max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.95, seed=7)
    assert generator.generate(QUESTION, params).text == generator.generate(QUESTION, params).text
    outputs = {generator.generate(QUESTION, GenerationParams(max_new_tokens=10, temperature=1.3, seed=s)).text
               for s in range(4)}
    assert len(outputs) > 1
    seen = {}
    real_generate = generator.model.generate
    monkeypatch.setattr(generator.model, "generate", lambda **kwargs: seen.update(kwargs) or real_generate(**kwargs))
    generator.generate(QUESTION, GenerationParams(max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.5, seed=1,
                                                  stop=["\n\n"]))
    assert (seen["max_new_tokens"], seen["do_sample"], seen["temperature"], seen["top_k"], seen["top_p"]) == (
        3, True, 0.7, 5, 0.5)
    assert seen["stop_strings"] == ["\n\n"]


def test_streaming_yields_the_same_text_as_generation_at_temperature_zero(generator):
    params = GenerationParams(max_new_tokens=20)
    pieces = list(generator.stream(QUESTION, params))
    assert len(pieces) > 1
    assert "".join(pieces) == generator.generate(QUESTION, params).text
    stopped = GenerationParams(max_new_tokens=20, stop=[","])
    assert "".join(generator.stream(QUESTION, stopped)) == generator.generate(QUESTION, stopped).text


def test_option_logprobs_prefers_the_right_answer(generator):
    question = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
    scores = generator.option_logprobs(question, ["Paris", "London"])
    assert scores["Paris"] > scores["London"]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=0), dict(top_p=1.5),
                                 dict(stop=[""])])
def test_invalid_params_are_rejected_with_a_reason(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GenerationParams(**bad)


def test_missing_model_and_missing_adapter_are_clear_errors(tmp_path):
    from rag.generate import TransformersGenerator

    with pytest.raises(ModelNotFoundError, match="Decoder model not found"):
        TransformersGenerator(tmp_path / "no-such-model")
    with pytest.raises(NoAdapterConfigured, match="rag finetune"):
        require_adapter(Settings())
