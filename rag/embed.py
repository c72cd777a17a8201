"""Sentence embeddings: normalised vectors, so inner product is cosine similarity."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from rag.models import default_embedding_path, existing_path


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Embeds chunks and queries with a sentence-transformers model loaded from a local folder.

    >>> embedder = Embedder()  # the packaged all-MiniLM-L6-v2
    >>> embedder.encode(["hello world"]).shape
    (1, 384)
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "auto", batch_size: int = 64):
        self.path = existing_path(model_path, "Embedding model") if model_path else default_embedding_path()
        self.device = resolve_device(device)
        self.batch_size = batch_size

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in CLI output

        return SentenceTransformer(str(self.path), device=self.device, local_files_only=True)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @cached_property
    def name(self) -> str:
        """Identity recorded in the index manifest, compared when an index is opened."""
        if self.path.resolve() == default_embedding_path().resolve():
            return "sentence-transformers/all-MiniLM-L6-v2"
        return self.path.name if self.path.name != "model" else self.path.parent.name

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens, special tokens included; text past it would be silently truncated."""
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_query(self, query: str) -> np.ndarray:
        return self.encode([query])[0]
