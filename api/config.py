"""Service settings that only the HTTP API needs, read from `RAG_*` environment variables.

They sit beside `rag.config.Settings` (index, models) rather than in it because only `rag serve` uses them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rag.generation.base import MAX_NEW_TOKENS
from rag.generation.transformers_backend import MAX_BATCH

MAX_QUESTION_CHARS = 2000  # every route that takes a question or query (/v1/ask, /v1/search, chat completions)
MAX_ANSWER_CHARS = 8000  # an earlier answer sent back as conversation history
MAX_HISTORY_TURNS = 32  # the prompt keeps only the most recent turns that fit its token budget anyway
MAX_SOURCE_PATTERN_CHARS = 500  # a `source` glob that limits retrieval (/v1/ask, /v1/search, chat completions)

# Generation parameters a request may send, where the API is tighter than the library's bounds (rag.generation.base:
# MAX_TOP_K, MAX_SEED, MAX_STOP_SEQUENCES, MAX_STOP_CHARS): a 32-bit seed, and OpenAI's 4 stop sequences.
REQUEST_MAX_TOP_K = 1000
REQUEST_MAX_SEED = 2**32 - 1
REQUEST_MAX_STOP_SEQUENCES = 4
REQUEST_MAX_STOP_CHARS = 64


class ApiSettings(BaseSettings):
    """Every field can be set as `RAG_<FIELD>`, e.g. `RAG_MAX_CONCURRENT_GENERATIONS=2`."""

    model_config = SettingsConfigDict(env_prefix="RAG_", env_file=None, extra="ignore")

    api_keys: str = Field("", repr=False, description="Comma-separated API keys; none configured = auth off.")
    api_keys_file: Path | None = Field(None, description="File with one API key per line ('#' starts a comment).")
    revoked_api_keys: str = Field("", repr=False, description="Comma-separated keys that are refused with 403.")
    key_cache_s: float = Field(5.0, ge=0, le=3600, description="How long a key looked up in the key store is "
                               "remembered: a key revoked by another process is refused within this time.")
    max_concurrent_generations: int = Field(MAX_BATCH, ge=1, le=64, description=(
        "Generations let in at once: the in-process decoder decodes that many together (at most 8), vLLM batches "
        "what it is sent."))
    max_queue: int = Field(16, ge=0, le=10_000, description="Generations waiting for a slot before 503.")
    queue_timeout_s: float = Field(30, ge=0, le=3600, description="Longest wait for a generation slot: a request "
                                   "that would wait longer is answered 503 with Retry-After, before its client "
                                   "times out (0 = never wait).")
    retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After of a 503 when no wait can be estimated "
                               "(still loading, no index yet, busy before any generation was timed).")
    max_new_tokens_limit: int = Field(1024, ge=1, le=MAX_NEW_TOKENS,
                                      description="Largest max_new_tokens a request may ask.")
    max_upload_mb: float = Field(20, gt=0, le=10_240, description="Largest upload request (all files together).")
    max_upload_files: int = Field(32, ge=1, le=1000)
    index_poll_s: float = Field(2.0, ge=0, description="How often to look for a snapshot written by another "
                                "process (e.g. `rag ingest` or another worker); 0 = never.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
