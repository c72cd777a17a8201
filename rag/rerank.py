"""Second-stage ranking: a cross-encoder reads the question and each candidate passage together and scores them.

The packaged model (rag/data/reranker) is all-MiniLM-L6-v2 with a one-logit head, trained on development pairs
by scripts/train_reranker.py, which writes its record (training.json: data hashes, split, hyper-parameters,
validation figures, the model file's sha256). Inputs are "[CLS] question [SEP] passage [SEP]" with the passage
truncated so that the question is always read whole (a question over QUESTION_TOKENS is cut as well).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from rag.config import Settings
from rag.errors import UserError
from rag.models import ModelNotFoundError, sha256_files

PACKAGED_RERANKER = Path(__file__).parent / "data" / "reranker"
MODEL_FILE = "model.onnx"
RECORD_FILE = "training.json"
MAX_TOKENS = 256  # question + passage, special tokens included: what the model was trained on
QUESTION_TOKENS = 96  # a longer question is cut too, so that a passage always keeps room
DEFAULT_BATCH_SIZE = 16


class PairEncoder:
    """Tokenises (question, passage) pairs as the model was trained: the `tokenizers` library alone, no transformers
    import (fast to load, safe beside a decoder loading in another thread, like rag/embed_onnx.py)."""

    def __init__(self, folder: Path, max_tokens: int = MAX_TOKENS):
        from tokenizers import Tokenizer

        self.max_tokens = max_tokens
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def encode(self, question: str, passages: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids, attention_mask and token_type_ids of the pairs, padded to the longest."""
        question_ids = self.tokenizer.encode(question, add_special_tokens=False).ids[:QUESTION_TOKENS]
        question = self.tokenizer.decode(question_ids) if len(question_ids) == QUESTION_TOKENS else question
        self.tokenizer.enable_truncation(self.max_tokens, strategy="only_second")
        try:
            encodings = self.tokenizer.encode_batch([(question, passage) for passage in passages])
        finally:
            self.tokenizer.no_truncation()
        width = max(len(encoding.ids) for encoding in encodings)
        columns = {name: np.zeros((len(encodings), width), np.int64)
                   for name in ("input_ids", "attention_mask", "token_type_ids")}
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            columns["input_ids"][row, :n] = encoding.ids
            columns["attention_mask"][row, :n] = 1
            columns["token_type_ids"][row, :n] = encoding.type_ids
        return columns


class Reranker:
    """Scores passages for a question with the ONNX cross-encoder; higher is more relevant (a logit).

    >>> reranker = Reranker()  # doctest: +SKIP
    >>> reranker.scores("What was net revenue in 2023?", ["Net revenue was $5.1 billion in 2023.", "..."])
    ... # doctest: +SKIP
    """

    def __init__(self, folder: Path | None = None, threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.folder = Path(folder) if folder is not None else PACKAGED_RERANKER
        self.model_path = self.folder / MODEL_FILE
        if not self.model_path.is_file() or not (self.folder / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"No reranker model in '{self.folder}' (model.onnx and tokenizer.json).")
        self.threads = threads
        self.batch_size = batch_size

    @classmethod
    def from_settings(cls, settings: Settings) -> "Reranker":
        return cls(threads=settings.rerank_threads)

    @cached_property
    def pairs(self) -> PairEncoder:
        return PairEncoder(self.folder, int(self.record.get("max_tokens", MAX_TOKENS)))

    @cached_property
    def record(self) -> dict:
        path = self.folder / RECORD_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @cached_property
    def session(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        return onnxruntime.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])

    def sha256(self) -> str:
        return sha256_files(self.model_path)

    def scores(self, question: str, passages: Sequence[str]) -> np.ndarray:
        """One relevance logit per passage (float32), in the passages' order."""
        if not question.strip():
            raise UserError("The question is empty.")
        out = np.zeros(len(passages), np.float32)
        if not passages:
            return out
        session = self.session
        names = {item.name for item in session.get_inputs()}
        # Longest first, so that each batch is padded only to inputs of like length.
        order = np.argsort([-len(passage) for passage in passages], kind="stable")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            feeds = self.pairs.encode(question, [passages[i] for i in batch])
            out[batch] = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][:, 0]
        return out
