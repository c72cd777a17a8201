"""One settings object for every command, read from `RAG_*` environment variables; CLI flags override fields."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rag.types import DEFAULT_COLLECTION, AnswerPath, check_collection

# The adapter shipped inside the package (scripts/train_packaged_adapter.sh reproduces it).
PACKAGED_ADAPTER = Path(__file__).parent / "data" / "adapter"


# Defaults and bounds that several interfaces show (CLI options, API schemas, the chunker): defined here, once.
DEFAULT_CHUNK_TOKENS = 200
DEFAULT_CHUNK_OVERLAP = 32
DEFAULT_SEARCH_RESULTS = 5
MAX_CHUNKS = 50  # most chunks one search returns or one prompt holds
SERVED_ANSWER_CHUNKS = 8  # sources in the prompt of a served decoder (fitted to its context window)
DEFAULT_RERANK_CANDIDATES = 30  # hybrid candidates the cross-encoder re-scores (its cost is per candidate)
MAX_RERANK_CANDIDATES = 200
# Chunks per embedding batch. On 2 CPU cores, filing chunks (~180 tokens) embed faster in small batches: per chunk,
# bf16 23.3 ms at 16 against 25.3 ms at 64, fp32 36.0 ms against 40.3 ms at 32 (2026-11-30). GPUs want larger ones.
DEFAULT_EMBEDDING_BATCH_SIZE = 16


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rag-service"


class Settings(BaseSettings):
    """Configuration of the pipeline. Every field can be set as `RAG_<FIELD>` (e.g. `RAG_INDEX_DIR=./idx`)."""

    model_config = SettingsConfigDict(env_prefix="RAG_", env_file=None, extra="ignore")

    index_dir: Path = Field(Path("./rag-index"), description="Directory holding the index (SQLite + vector segments).")

    # Where the index lives when it is not a local directory, and which part of it a command works on
    store_url: str | None = Field(
        None, repr=False, description="postgresql://user:password@host:port/db: keep the index in PostgreSQL + "
        "pgvector (many API replicas and `rag worker`s share it). Unset: the embedded store in index_dir.")
    collection: str = Field(DEFAULT_COLLECTION, description="The collection (named set of documents) that ingest, "
                            "search, ask, documents, jobs and eval work on.")
    uploads_dir: Path | None = Field(
        None, description="Folder of uploaded files, shared by every node that runs ingestion jobs (mount the same "
        "folder everywhere); default: <index_dir>/uploads.")
    job_lease_s: float = Field(60.0, gt=0, description="A worker holds a job this long between heartbeats; a job "
                               "whose worker died is retried by another once its lease expires.")
    job_max_attempts: int = Field(3, ge=1, description="Runs of one ingestion job before it is failed for good.")
    db_pool_size: int = Field(4, ge=1, le=256, description="Connections per process to the store's database.")
    db_timeout_s: float = Field(10.0, gt=0, description="Longest wait for a database connection or statement "
                                "start before the request fails with 503 / exit code 3.")

    # Embeddings
    embedding_model: str | None = Field(
        None, description="Sentence-transformers model folder; default: the packaged all-MiniLM-L6-v2."
    )
    embedding_batch_size: int = Field(DEFAULT_EMBEDDING_BATCH_SIZE, ge=1, le=4096)
    device: str = Field("auto", description="'auto' (cuda if present, else cpu), 'cpu' or 'cuda'.")
    embedding_precision: Literal["auto", "fp32", "bf16", "onnx", "onnx-int8"] = Field(
        "auto", description="'auto': the fastest path: bf16 autocast on CUDA and on CPUs with AMX; on other CPUs "
        "onnx-int8 (ONNX Runtime, int8 weights), also where bf16 has no AMX (AVX512-BF16 alone). An index's recorded "
        "weights decide over the machine's choice. fp32/bf16: torch; onnx: ONNX Runtime fp32."
    )
    model_cache_dir: Path | None = Field(
        None, description="Where models derived from the packaged ones (ONNX exports) are cached; "
        "default: $XDG_CACHE_HOME/rag-service/onnx (~/.cache/rag-service/onnx).")

    # Chunking, counted in embedding-model tokens
    chunk_tokens: int = Field(DEFAULT_CHUNK_TOKENS, ge=16, description="Target chunk size in embedding tokens.")
    chunk_overlap: int = Field(DEFAULT_CHUNK_OVERLAP, ge=0,
                               description="Tokens shared by consecutive chunks of one section.")

    # Second-stage ranking (rag/rerank.py: the packaged cross-encoder, scripts/train_reranker.py)
    rerank: bool = Field(False, description="Re-score the hybrid stage's top candidates with the packaged "
                         "cross-encoder (reads question and passage together); false: hybrid order only.")
    rerank_candidates: int = Field(
        DEFAULT_RERANK_CANDIDATES, ge=1, le=MAX_RERANK_CANDIDATES,
        description="Hybrid candidates the cross-encoder re-scores per question (its cost grows with them).")
    rerank_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads of the reranker; unset: "
                                       "ONNX Runtime's default (the machine's cores).")

    # Answering
    answer_chunks: int | None = Field(
        None, ge=1, le=MAX_CHUNKS,
        description="Chunks put in a RAG prompt (-k); unset: 1 for the in-process decoder, "
        f"{SERVED_ANSWER_CHUNKS} for a served one (the `openai` backend). 1 suits the packaged 135M model: on 100 "
        "XQuAD questions its F1 was 0.277 with 1 chunk, 0.227 with 2 and 0.208 with 5 (extra chunks distract it "
        "more than they add recall); a capable served model gets the evidence whole, within its context window.",
    )

    # Ingestion
    parse_workers: int = Field(
        1, ge=1, le=64, description="Processes parsing documents beside the embedding (each file within the "
        "budget below; on 2 cores with bf16 embedding, 2 measured slower end to end than 1). Raise it on machines "
        "with more cores.")

    # Hostile or runaway files: limits checked before a file is parsed (ingest/limits.py) and the budget of the
    # worker process that parses it (ingest/sandbox.py). A file over one fails with a reason naming the setting.
    max_file_mb: float = Field(200.0, gt=0, description="Largest file ingested, in MB.")
    max_expanded_mb: float = Field(
        512.0, gt=0, description="Most MB a zip container (docx, pptx, xlsx, odt, epub) may inflate to, read from "
        "its central directory before anything is inflated (a zip bomb is refused).")
    max_zip_members: int = Field(10_000, ge=1, description="Most files inside one zip container.")
    max_sheet_rows: int = Field(100_000, ge=1, description="Most rows in one spreadsheet sheet.")
    max_sheet_cells: int = Field(2_000_000, ge=1, description="Most cells in one spreadsheet sheet.")
    max_pdf_pages: int = Field(2_000, ge=1, description="Most pages in one PDF.")
    max_document_chars: int = Field(20_000_000, ge=1, description="Most characters of text in one document.")
    max_nesting_depth: int = Field(
        200, ge=8, le=250, description="HTML nested deeper than this is flattened to it, with a warning (the HTML "
        "parser below drops what lies deeper than 255 levels).")
    parse_timeout_s: float = Field(
        300.0, gt=0, description="Longest a parse worker may spend on one file (a long PDF: on each range of its "
        "pages); the file then fails and the worker is replaced.")
    parse_memory_mb: int = Field(
        2048, ge=64, description="Memory a parse worker may take for one file, on top of what it holds when it "
        "starts (an address-space limit); past it the file fails and the worker is replaced.")
    # OCR of scanned pages and image files (ingest/ocr.py: Debian's tesseract, installed by scripts/install.sh).
    ocr: Literal["auto", "off"] = Field(
        "auto", description="auto: read PDF pages without a usable text layer, and PNG/JPEG/TIFF files, with OCR "
        "(where tesseract is installed); off: report such pages as not indexed and refuse image files.")
    ocr_min_confidence: float = Field(
        0.8, ge=0, le=1, description="Pages OCR reads with a lower mean word confidence (0-1) are ingested with a "
        "warning on their document.")
    ocr_page_timeout_s: float = Field(
        60.0, gt=0, description="Longest OCR may spend on one page; the page is then left out with a warning.")
    keep_duplicates: bool = Field(
        False, description="Index a file whose bytes equal a document's already in the collection (under another "
        "name) as a document of its own; by default it is reported as a duplicate of that one and not indexed again.")
    job_retention_days: float = Field(
        7.0, gt=0, description="Finished ingestion jobs older than this are forgotten (GET /v1/jobs/{id} then 404s).")

    # Index maintenance: background compaction merges small segments and drops deleted vectors
    compact_max_segments: int = Field(
        8, ge=1, description="Compact once there are more small segments than this (each commit adds one).")
    compact_tombstone_ratio: float = Field(
        0.2, gt=0, le=1, description="Compact everything once deleted vectors exceed this share of stored ones.")

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
    openai_lora: str | None = Field(
        None, description="openai backend: name of a LoRA adapter the server serves (vLLM --lora-modules "
        "NAME=FOLDER; scripts/engine.sh with RAG_ENGINE_LORA serves one by its folder's name): the fine-tuned paths "
        "ask the server for it.")
    context_window: int | None = Field(None, description="Override the decoder's context length in tokens.")
    decoder_threads: int | None = Field(
        None, ge=1, description="Torch threads of the in-process decoder; unset: before each answer, the cores other "
        "processes leave free (at least 1), since threads that wait on a busy core make answers several times slower.")
    adapter_dir: Path | None = Field(None, description="LoRA adapter folder for the fine-tuned paths.")
    packaged_adapter: bool = Field(
        True, description="Apply the shipped LoRA adapter (trained on XQuAD's training articles, rag/data/adapter) "
        "when the decoder is the packaged SmolLM2-135M and no adapter_dir is set. Ignored for any other decoder.")
    answer_path: str = Field(
        "auto", description="Path of an answer when none is asked for: 'auto' is finetuned-rag when an adapter "
        "applies to the decoder (the shipped one, on the packaged model), else rag; or prompt, rag, finetuned, "
        "finetuned-rag.")

    # Answers the sources do not hold
    abstain: bool = Field(True, description="Answer 'not answerable' when the retrieved sources do not hold the "
                          "answer (rag/answerability.py), instead of quoting the closest source.")
    answerable_threshold: float | None = Field(
        None, ge=0, le=1, description="Confidence below which a question is called not answerable; default: the "
        "calibrated threshold in rag/data/answerability.json.")
    follow_up_rewrite: str = Field(
        "rule", description="How a follow-up question is made standalone before retrieval: rule, decoder or none "
        "(rag/conversation.py; measured by bench/followups.py).")

    @field_validator("collection")
    @classmethod
    def _valid_collection(cls, value: str) -> str:
        return check_collection(value)

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("store_url must be a postgresql:// URL (or unset for the embedded store)")
        return value or None

    @property
    def upload_root(self) -> Path:
        return self.uploads_dir if self.uploads_dir is not None else self.index_dir / "uploads"

    @field_validator("answer_path")
    @classmethod
    def _known_path(cls, value: str) -> str:
        return value if value == "auto" else AnswerPath.parse(value).value

    @field_validator("follow_up_rewrite")
    @classmethod
    def _known_rewrite(cls, value: str) -> str:
        from rag.conversation import RewriteMode

        return RewriteMode.parse(value).value

    @property
    def adapter(self) -> Path | None:
        """The adapter the fine-tuned paths use: adapter_dir, else the shipped one where it fits the decoder."""
        if self.backend == "openai" and self.openai_lora:
            return Path(self.openai_lora)  # served by name: the factory asks the server for this name
        if self.adapter_dir is not None:
            return self.adapter_dir
        if self.packaged_adapter and self.backend == "transformers" and self.decoder_model is None \
                and (PACKAGED_ADAPTER / "adapter_config.json").is_file():
            return PACKAGED_ADAPTER
        return None

    @property
    def prompt_chunks(self) -> int:
        """`answer_chunks`, or its default for the configured backend."""
        if self.answer_chunks is not None:
            return self.answer_chunks
        return SERVED_ANSWER_CHUNKS if self.backend == "openai" else 1

    @property
    def default_path(self) -> AnswerPath:
        if self.answer_path != "auto":
            return AnswerPath.parse(self.answer_path)
        return AnswerPath.FINETUNED_RAG if self.adapter is not None else AnswerPath.RAG

    # Evaluation reports
    results_dir: Path = Field(Path("./results"), description="Folder of `rag eval` reports, one sub-folder each "
                              "(report.md, results.json, plots); listed read-only by `rag serve` at /v1/evals.")

    # Start-up
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Folder for data derived from models "
                            "(default: $XDG_CACHE_HOME/rag-service, else ~/.cache/rag-service).")
    decoder_cache: bool = Field(True, description="Keep a dequantised copy of a .gguf decoder in cache_dir: later "
                                "starts load it in about a second instead of dequantising again (15-25 s here).")

    @property
    def decoder_cache_dir(self) -> Path | None:
        return self.cache_dir.expanduser() if self.decoder_cache else None

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
