"""One settings object for every command, read from `RAG_*` environment variables; CLI flags override fields."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the pipeline. Every field can be set as `RAG_<FIELD>` (e.g. `RAG_INDEX_DIR=./idx`)."""

    model_config = SettingsConfigDict(env_prefix="RAG_", env_file=None, extra="ignore")

    index_dir: Path = Field(Path("./rag-index"), description="Directory holding the index snapshots.")

    # Embeddings
    embedding_model: str | None = Field(
        None, description="Sentence-transformers model folder; default: the packaged all-MiniLM-L6-v2."
    )
    embedding_batch_size: int = Field(64, ge=1, le=4096)
    device: str = Field("auto", description="'auto' (cuda if present, else cpu), 'cpu' or 'cuda'.")
    embedding_precision: Literal["auto", "fp32", "bf16", "onnx", "onnx-int8"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA and on CPUs with native bf16 (2.4x here); on other CPUs "
        "onnx-int8 (ONNX Runtime, int8 weights). fp32/bf16: torch; onnx: ONNX Runtime fp32."
    )
    model_cache_dir: Path | None = Field(
        None, description="Where models derived from the packaged ones (ONNX exports) are cached; "
        "default: $XDG_CACHE_HOME/rag-service/onnx (~/.cache/rag-service/onnx).")

    # Chunking, counted in embedding-model tokens
    chunk_tokens: int = Field(200, ge=16, description="Target chunk size in embedding tokens.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks of one section.")

    # Answering
    answer_chunks: int = Field(
        1, ge=1, le=50,
        description="Chunks put in a RAG prompt (-k). 1 suits the packaged 135M model: on 100 XQuAD questions its "
        "F1 was 0.277 with 1 chunk, 0.227 with 2 and 0.208 with 5 (extra chunks distract it more than they add "
        "recall). Raise it for larger decoders.",
    )

    # Ingestion
    parse_workers: int = Field(
        1, ge=1, le=64, description="Processes parsing documents beside the embedding (1: parse in-process; on 2 "
        "cores with bf16 embedding, 2 measured slower end to end). Raise it on machines with more cores.")

    # Decoder
    backend: Literal["transformers", "openai"] = "transformers"
    decoder_model: str | None = Field(
        None, description="HF model folder or .gguf file (transformers backend); default: packaged SmolLM2-135M."
    )
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "default"
    openai_api_key: str = Field("EMPTY", repr=False)
    openai_timeout: float = Field(120.0, gt=0)
    openai_max_retries: int = Field(2, ge=0)
    context_window: int | None = Field(None, description="Override the decoder's context length in tokens.")
    adapter_dir: Path | None = Field(None, description="LoRA adapter folder for the fine-tuned paths.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "Settings":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self

    def with_overrides(self, **overrides: object) -> "Settings":
        """A copy with the CLI flags that were actually given (None means 'not given')."""
        given = {key: value for key, value in overrides.items() if value is not None}
        return self.model_validate({**self.model_dump(), **given})
