"""Sentence embeddings with ONNX Runtime: the packaged model exported once, optionally int8-quantised, cached.

Why: on CPUs without native bf16 the torch fp32 path has no fast kernels; ONNX Runtime fuses attention, layer norm
and GELU, and its dynamic int8 quantisation runs the matmuls on VNNI/AVX2 integer units. The graph is exported from
the local sentence-transformers folder at first use (torch.onnx, no download) and cached under a folder named by
the weights' hash, so a changed model is never served from a stale export. Pooling and normalisation are those of
sentence-transformers' Pooling(mean) + Normalize modules.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from rag.models import cpu_flags, sha256_files, transformers_lock

log = logging.getLogger(__name__)

ONNX_PRECISIONS = ("onnx", "onnx-int8")
EXPORT_VERSION = 2  # bump when the export or quantisation recipe changes (2: no NaN guards after softmax)
OPSET = 17


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rag-service" / "onnx"


def int8_weight_bits() -> int:
    """8, or 7 on x86 CPUs without VNNI. There ONNX Runtime multiplies uint8 activations by int8 weights with
    VPMADDUBSW, whose pairwise int16 sums saturate (its quantization docs); 7-bit weights keep them in range.
    `bench/int8.py` runs both graphs under `qemu-x86_64 -cpu Haswell`: cosine to fp32 0.9905 with 8-bit weights
    there, 0.9921 with 7-bit (0.9934 with 8-bit on VNNI)."""
    flags = cpu_flags()
    saturates = "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
    return 7 if saturates else 8


def max_seq_length(model_dir: Path) -> int:
    try:
        return int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 512))


def _check_mean_pooling(model_dir: Path) -> None:
    """Only mean pooling (+ normalisation) is reimplemented here; refuse models that pool otherwise."""
    modules = json.loads((model_dir / "modules.json").read_text())
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            if not config.get("pooling_mode_mean_tokens") or any(
                    value for key, value in config.items() if key.startswith("pooling_mode_") and key !=
                    "pooling_mode_mean_tokens"):
                raise ValueError(f"ONNX embedding supports mean pooling only; '{model_dir}' pools otherwise")
        elif module.get("type", "").endswith("Dense"):
            raise ValueError(f"ONNX embedding does not support Dense modules ('{model_dir}'); use fp32 or bf16")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def export(model_dir: Path, cache_dir: Path, quantised: bool) -> Path:
    """Path of the cached ONNX graph for this model (exported/quantised now if missing)."""
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    key = sha256_files(model_dir / "config.json", *weights)[:16]
    folder = cache_dir / f"{model_dir.name}-{key}-v{EXPORT_VERSION}"
    bits = int8_weight_bits()
    fp32_path = folder / "model.onnx"
    int8_path = folder / ("model.int8.onnx" if bits == 8 else f"model.int8-w{bits}.onnx")
    if not fp32_path.exists():
        import torch
        with transformers_lock():
            from transformers import AutoModel

        _check_mean_pooling(model_dir)
        log.info("Exporting %s to ONNX (once; cached in %s)", model_dir, folder)
        with transformers_lock():
            encoder = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

        class LastHiddenState(torch.nn.Module):  # named tensors in, one tensor out: what the tracer handles
            def __init__(self):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                    return_dict=True).last_hidden_state

        model = LastHiddenState().eval()
        # The second row is padded: traced with an all-ones mask, the attention code may drop the mask altogether.
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        sample = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": mask,
                  "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
        axes = {"batch": 0, "sequence": 1}
        dynamic = {name: {index: axis for axis, index in axes.items()} for name in [*sample, "last_hidden_state"]}
        temporary = _atomic_target(fp32_path)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape checks that hold for every input it will see
            torch.onnx.export(model, tuple(sample.values()), str(temporary), input_names=list(sample),
                              output_names=["last_hidden_state"], dynamic_axes=dynamic, opset_version=OPSET,
                              dynamo=False)
        _drop_nan_guards(temporary)
        temporary.replace(fp32_path)
    if quantised and not int8_path.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        temporary = _atomic_target(int8_path)
        # Weights only, per output channel, MatMul only: cosine 0.992 (min 0.985) to fp32 on filing passages;
        # per-tensor scales, or quantised embeddings/attention, dropped it to 0.93-0.95.
        # ORT logs its advice to pre-process the graph first as a WARNING at every first use; this recipe is
        # measured as it is, without that step (bench/int8.py, docs/benchmarks.md).
        advice = _DropMessage("Please consider to run pre-processing")
        logging.getLogger().addFilter(advice)
        try:
            quantize_dynamic(str(fp32_path), str(temporary), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=bits == 7, op_types_to_quantize=["MatMul"])
        finally:
            logging.getLogger().removeFilter(advice)
        temporary.replace(int8_path)
    return int8_path if quantised else fp32_path


def _drop_nan_guards(path: Path) -> None:
    """Remove the guard torch's attention export puts after each softmax, Where(IsNaN(weights), 0, weights). A row
    of attention weights is NaN only when every key in it is masked, and a tokenised input always has [CLS] and
    [SEP] unmasked. The guard is two more passes over batch × heads × tokens² weights in every layer:
    a quarter of the int8 graph's time and a sixth of the fp32 one's (ONNX Runtime's profile, 16 chunks of 182
    tokens); without it the outputs are bit for bit the same, padded batches included."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    replaced, dropped = {}, set()
    for node in graph.node:
        if node.op_type != "Where":
            continue
        guard, weights = producer.get(node.input[0]), producer.get(node.input[2])
        if (guard is not None and weights is not None and guard.op_type == "IsNaN" and weights.op_type == "Softmax"
                and guard.input[0] == node.input[2]):
            replaced[node.output[0]] = node.input[2]
            dropped.update((id(node), id(guard)))
    if not replaced:
        return
    kept = [node for node in graph.node if id(node) not in dropped]
    for node in kept:
        node.input[:] = [replaced.get(name, name) for name in node.input]
    used = {name for node in kept for name in node.input} | {output.name for output in graph.output}
    kept = [node for node in kept if node.op_type != "Constant" or node.output[0] in used]  # the guards' zeros
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(path))


def longest_first(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of indices, longest first by token count: a batch is as long as its longest input, so inputs of
    like length go together. (sentence-transformers orders by characters: on filing chunks, where a table row has
    more tokens per character than prose, that left 20% of every batch padding; by tokens, under 1% over 1,024
    chunks.)"""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


class OnnxEncoder:
    """Encodes texts like SentenceTransformer.encode(normalize_embeddings=True), on ONNX Runtime (CPU)."""

    def __init__(self, model_dir: Path, quantised: bool, cache_dir: Path | None = None):
        self.model_dir = model_dir
        self.graph = export(model_dir, cache_dir or default_cache_dir(), quantised)
        self.max_tokens = max_seq_length(model_dir)

    @cached_property
    def tokenizer(self):
        with transformers_lock():
            from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)

    @cached_property
    def _encoder(self):
        """The model's fast tokenizer through the `tokenizers` library itself (what AutoTokenizer wraps), set to
        truncate and pad like the sentence-transformers call: it loads in milliseconds and without importing
        transformers, whose lazy module is not safe to import from two threads at once (a decoder loads in a
        background thread while the first query is embedded)."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        config = json.loads((self.model_dir / "tokenizer_config.json").read_text())
        pad = config.get("pad_token") or "[PAD]"
        pad = pad["content"] if isinstance(pad, dict) else pad
        tokenizer.enable_truncation(self.max_tokens)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
        return tokenizer

    @cached_property
    def session(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        self.input_names = {item.name for item in session.get_inputs()}
        return session

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        session = self.session
        if not texts:
            return np.zeros((0, 0), np.float32)
        encodings = self._encoder.encode_batch(texts)  # padded to the longest; each batch is cut to its own
        columns = {"input_ids": np.array([e.ids for e in encodings], np.int64),
                   "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
                   "token_type_ids": np.array([e.type_ids for e in encodings], np.int64)}
        lengths = columns["attention_mask"].sum(axis=1)
        out = None
        for batch in longest_first(lengths, batch_size):
            width = int(lengths[batch[0]])
            feeds = {name: columns[name][batch, :width] for name in self.input_names}
            hidden = session.run(["last_hidden_state"], feeds)[0]
            mask = columns["attention_mask"][batch, :width, None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            if out is None:
                out = np.zeros((len(texts), pooled.shape[1]), np.float32)
            out[batch] = pooled
        return np.ascontiguousarray(out)
