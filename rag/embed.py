"""Sentence embeddings: normalised vectors, so inner product is cosine similarity."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from rag.config import DEFAULT_EMBEDDING_BATCH_SIZE
from rag.embed_onnx import ONNX_PRECISIONS, OnnxEncoder, longest_first, max_seq_length
from rag.errors import UserError
from rag.models import (PRECISIONS, autocast, cpu_flags, default_embedding_path, existing_path, transformers_lock,
                        resolve_device, resolve_precision)
from rag.types import LONG_DOCUMENT_CHUNKS, Chunk

EMBEDDING_PRECISIONS = (*PRECISIONS, *ONNX_PRECISIONS)
# The CPU flag under which `auto` embeds in bf16: AMX tiles make it the fastest path (FinanceBench embedding on 2 Xeon
# cores: bf16 144 s, int8 163 s); with AVX512-BF16 alone int8 is faster (2 EPYC cores: 162-169 s against 181-208 s
# in four runs, before the int8 graph lost its NaN guards and became ~1.5x faster). docs/benchmarks.md,
# bench/documents.py.
AMX_BF16 = "amx_bf16"
# A long document's chunk vector is its text's plus this share of its context's (`Embedder.encode_chunks`). On the
# FinanceBench filings (one bf16 index's vectors recombined; hybrid doc hit@1 / hit@5 / page hit@5) 0.3 gave 0.854 /
# 0.979 / 0.729, 0.5 0.854 / 0.979 / 0.750, 0.7 0.875 / 0.979 / 0.750, 1.0 0.854 / 0.979 / 0.750, against 0.854 /
# 1.000 / 0.688 with the context in the same input as the text (docs/benchmarks.md, Embedding).
CONTEXT_WEIGHT = 0.5
log = logging.getLogger(__name__)


def weights_of(precision: str) -> str:
    """The weights a precision's vectors are computed with: 'int8' (the quantised ONNX graph), or 'fp32' (torch fp32,
    bf16 autocast over fp32 weights and ONNX fp32 give the same vectors, within cosine 0.9999). Vectors of the two
    differ enough to cost retrieval when passages and queries mix them (docs/benchmarks.md: hybrid doc hit@1 0.771
    vs 0.729)."""
    return "int8" if precision == "onnx-int8" else "fp32"


@dataclass(frozen=True, slots=True)
class ChunkInputs:
    """What the model is given for a list of chunks (`chunk_inputs`): each distinct string once, and per chunk the
    row of its text and of its context (None: none apart)."""

    distinct: list[str]
    text_rows: list[int]
    context_rows: list[int | None]


def chunk_inputs(chunks: list[Chunk], document_chunks: Mapping[str, int]) -> ChunkInputs:
    """The inputs of `Embedder.encode_chunks`: a chunk of a long document (`document_chunks[doc_id]`, its document's
    chunk count, at least LONG_DOCUMENT_CHUNKS) gives its text and its context (document card and section) apart, a
    chunk of a short document its context and text in one input; a string that recurs (a section's context,
    boilerplate, repeated tables) is given once."""
    apart = [document_chunks.get(chunk.doc_id, 0) >= LONG_DOCUMENT_CHUNKS for chunk in chunks]
    texts = [chunk.embedded_text if long or not chunk.embedded_context
             else f"{chunk.embedded_context}\n{chunk.embedded_text}" for chunk, long in zip(chunks, apart)]
    contexts = [chunk.embedded_context if long and chunk.embedded_context else None
                for chunk, long in zip(chunks, apart)]
    distinct = list(dict.fromkeys(texts + [context for context in contexts if context is not None]))
    row = {text: position for position, text in enumerate(distinct)}
    return ChunkInputs(distinct, [row[text] for text in texts],
                       [None if context is None else row[context] for context in contexts])


def check_embedding_precision(precision: str) -> str:
    if precision not in EMBEDDING_PRECISIONS:
        raise UserError(f"Unknown precision '{precision}'. Supported: {list(EMBEDDING_PRECISIONS)}")
    return precision


def declared_dimension(folder: Path) -> int | None:
    """Output size a sentence-transformers folder declares (its last Pooling or Dense module), or None."""
    import json

    try:
        modules = json.loads((folder / "modules.json").read_text())
        dimension = None
        for module in modules:
            config_path = folder / module.get("path", "") / "config.json"
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                dimension = json.loads(config_path.read_text())["word_embedding_dimension"]
            elif kind.endswith("Dense"):
                dimension = json.loads(config_path.read_text())["out_features"]
        return int(dimension) if dimension else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Embedder:
    """Embeds chunks and queries with a sentence-transformers model loaded from a local folder.

    >>> embedder = Embedder()  # the packaged all-MiniLM-L6-v2
    >>> embedder.encode(["hello world"]).shape
    (1, 384)
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "auto",
                 batch_size: int = DEFAULT_EMBEDDING_BATCH_SIZE,
                 precision: str = "auto", cache_dir: str | Path | None = None):
        self.path = existing_path(model_path, "Embedding model") if model_path else default_embedding_path()
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # Resolved on first use: deciding 'auto' imports torch (~1 s), which a no-op re-ingest never needs.
        self._device, self._precision = device, check_embedding_precision(precision)
        self._index_weights: str | None = None  # the weights of the index's vectors, once `follow` was told

    @cached_property
    def device(self) -> str:
        return resolve_device(self._device)

    @cached_property
    def precision(self) -> str:
        """fp32 or bf16 (torch), onnx or onnx-int8 (ONNX Runtime, CPU). 'auto' takes the fastest: bf16 on CUDA and
        on CPUs with AMX; onnx-int8 on other CPUs, those with AVX512-BF16 only (AMD Zen 4) included (FinanceBench
        filings, hybrid retrieval the same: docs/benchmarks.md). An index whose vectors are int8 (`follow`) gets
        onnx-int8 on every device; one whose vectors are fp32, never."""
        if self._precision in ONNX_PRECISIONS:
            return self._precision
        if self._precision == "auto" and self._index_weights == "int8":
            return "onnx-int8"
        resolved = resolve_precision(self._precision, self.device)
        if self._precision == "auto" and self.device == "cpu" and self._index_weights is None and (
                resolved == "fp32" or AMX_BF16 not in cpu_flags()):
            return "onnx-int8"
        return resolved

    @property
    def weights(self) -> str:
        """'fp32' or 'int8': what the vectors this embedder writes are computed with (`weights_of`), recorded with
        every document it embeds. Known without loading anything once `follow` was told the index's."""
        if self._precision != "auto":
            return weights_of(self._precision)
        return self._index_weights or weights_of(self.precision)

    def follow(self, index_weights: str | None) -> None:
        """Embed like the index whose vectors were computed with `index_weights` (None: a new index, or one built
        before they were recorded: this machine's own choice). With 'auto', passages and queries use those weights
        whatever this machine would pick for a new index, so machines with different CPUs (or a GPU) write and query
        one index alike. An explicit precision is kept, with a warning when it differs."""
        if index_weights == self._index_weights:
            return
        self._index_weights = index_weights
        if self._precision == "auto":
            for resolved in ("precision", "query_precision"):  # decided again, now by the index
                self.__dict__.pop(resolved, None)
        elif index_weights and weights_of(self._precision) != index_weights:
            log.warning("the index's vectors were computed with %s weights, RAG_EMBEDDING_PRECISION=%s computes %s "
                        "ones: queries match them less well, and documents ingested now are re-embedded (set 'auto' "
                        "to follow the index)", index_weights, self._precision, weights_of(self._precision))

    @classmethod
    def from_settings(cls, settings) -> Embedder:
        return cls(settings.embedding_model, settings.device, settings.embedding_batch_size,
                   settings.embedding_precision, settings.model_cache_dir)

    @cached_property
    def query_precision(self) -> str:
        """How the few short texts of a query are embedded. 'auto' on CPU: on ONNX Runtime, which loads without
        importing sentence-transformers (3-6 s of a one-shot `rag ask` here, docs/environment.md): in the int8 graph
        where passages are embedded in it (quantised alike: FinanceBench hybrid document hit@1 0.792 vs 0.771 with
        fp32 queries, 0.771 vs 0.729 on the 7-bit graph; XQuAD and PubMedQA recall@1 within 0.004 either way;
        docs/benchmarks.md), else in fp32 (as exact as torch fp32; a batch of one gains nothing from bf16).
        Otherwise the precision of `encode`."""
        if self._precision == "auto" and self.device == "cpu":
            return "onnx-int8" if self.precision == "onnx-int8" else "onnx"
        return self.precision

    @property
    def uses_onnx(self) -> bool:
        return self.precision in ONNX_PRECISIONS

    @property
    def onnx(self) -> OnnxEncoder:
        return self._onnx_encoder(self.precision)

    def _onnx_encoder(self, precision: str) -> OnnxEncoder:
        encoders = self.__dict__.setdefault("_onnx_encoders", {})
        if precision not in encoders:
            encoders[precision] = OnnxEncoder(self.path, quantised=precision == "onnx-int8", cache_dir=self.cache_dir)
        return encoders[precision]

    def autocast(self):
        """The precision context every encode runs in (weights stay fp32; bf16 matmuls where chosen)."""
        return autocast(self.device, self.precision)

    @cached_property
    def model(self):
        with transformers_lock():
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in CLI output

        with transformers_lock():
            return SentenceTransformer(str(self.path), device=self.device, local_files_only=True)

    @property
    def tokenizer(self):
        return self.onnx.tokenizer if self.uses_onnx else self.model.tokenizer

    @cached_property
    def name(self) -> str:
        """Identity recorded in the index manifest, compared when an index is opened."""
        if self.path.resolve() == default_embedding_path().resolve():
            return "sentence-transformers/all-MiniLM-L6-v2"
        return self.path.name if self.path.name != "model" else self.path.parent.name

    @cached_property
    def dimension(self) -> int:
        """Vector size, read from the folder's module configs when the model is not loaded yet: checking an index
        on an unchanged corpus then costs no model load (5 s of imports on 2 cores)."""
        if "model" not in self.__dict__:
            declared = declared_dimension(self.path)
            if declared:
                return declared
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens, special tokens included; text past it would be silently truncated."""
        if "model" in self.__dict__:
            return int(self.model.max_seq_length)
        return max_seq_length(self.path)

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.uses_onnx:
            return self.onnx.encode(texts, self.batch_size)
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        lengths = [len(ids) for ids in self.model.tokenizer(texts, truncation=True, max_length=self.max_tokens,
                                                            add_special_tokens=True)["input_ids"]]
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        with self.autocast():
            for batch in longest_first(np.array(lengths, dtype=np.int64), self.batch_size):
                vectors[batch] = self.model.encode([texts[i] for i in batch], batch_size=len(batch),
                                                   normalize_embeddings=True, convert_to_numpy=True,
                                                   show_progress_bar=False)
        return vectors

    def encode_chunks(self, chunks: list[Chunk], document_chunks: Mapping[str, int],
                      at_query_time: bool = False) -> np.ndarray:
        """Chunk vectors, from the inputs `chunk_inputs` lists. A chunk of a long document: the embedding of its
        text plus CONTEXT_WEIGHT times that of its context, normalised, so a context is embedded once for all the
        chunks of its section, not in each of them (it was a fifth of the tokens of filings). A chunk of a short
        document: its context and text in one input, as before; its few chunks repeat little, and apart the title
        weighs more than what a paragraph says (XQuAD hybrid recall@5 0.994 in one input, 0.990 apart).
        `at_query_time`: in the query precision (`Retriever.similarities`)."""
        if not chunks:
            return np.zeros((0, self.dimension), np.float32)
        encode = self.encode_queries if at_query_time else self.encode
        inputs = chunk_inputs(chunks, document_chunks)
        embedded = encode(inputs.distinct)
        vectors = embedded[inputs.text_rows]
        with_context = [position for position, row in enumerate(inputs.context_rows) if row is not None]
        context_rows = [inputs.context_rows[position] for position in with_context]
        vectors[with_context] += CONTEXT_WEIGHT * embedded[context_rows]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Query-time embedding (a question, a few passages to compare it with), in `query_precision`."""
        if self.query_precision in ONNX_PRECISIONS:
            return self._onnx_encoder(self.query_precision).encode(texts, self.batch_size)
        return self.encode(texts)

    def encode_query(self, query: str) -> np.ndarray:
        return self.encode_queries([query])[0]
