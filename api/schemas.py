"""Request and response bodies of the HTTP API: the wire format, kept apart from the library's domain objects."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import COLLECTION_HELP
from api.config import (
    MAX_ANSWER_CHARS,
    MAX_HISTORY_TURNS,
    MAX_QUESTION_CHARS,
    MAX_SOURCE_PATTERN_CHARS,
    REQUEST_MAX_SEED,
    REQUEST_MAX_STOP_CHARS,
    REQUEST_MAX_STOP_SEQUENCES,
    REQUEST_MAX_TOP_K,
)
from rag.config import DEFAULT_SEARCH_RESULTS, MAX_CHUNKS
from rag.generation.base import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, MAX_TEMPERATURE
from rag.store.keys import MAX_NAME
from rag.types import ALL_COLLECTIONS, MAX_COLLECTION_NAME, AnswerPath, RetrieverKind, Role


def _names(choice: type[Enum]) -> Any:
    """The wire names of a library enum, as a Literal: the schema lists exactly the values the library parses."""
    return Literal[tuple(member.value for member in choice)]


PathName = _names(AnswerPath)
RetrieverName = _names(RetrieverKind)
RoleName = _names(Role)
StopSequence = Annotated[str, Field(min_length=1, max_length=REQUEST_MAX_STOP_CHARS)]
# Checked (and defaulted) against the key by api.auth.authorize, with the library's rule for names.
CollectionName = Annotated[str | None, Field(min_length=1, max_length=MAX_COLLECTION_NAME,
                                             description=COLLECTION_HELP)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


class GenerationOptions(Strict):
    # The server's own bound (RAG_MAX_NEW_TOKENS_LIMIT, read at run time) is checked by api.answering.
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS,
                                description="Most tokens to generate (at most RAG_MAX_NEW_TOKENS_LIMIT).")
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, description="0 = greedy (deterministic).")
    top_k: int | None = Field(None, ge=1, le=REQUEST_MAX_TOP_K, description="Sample from the k likeliest tokens.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, le=REQUEST_MAX_SEED, description="Random seed for sampling.")
    stop: list[StopSequence] = Field(default_factory=list, max_length=REQUEST_MAX_STOP_SEQUENCES,
                                     description="Stop sequences.")


class TurnIn(Strict):
    question: str = Field(..., max_length=MAX_QUESTION_CHARS)
    answer: str = Field(..., max_length=MAX_ANSWER_CHARS)


class AskRequest(GenerationOptions):
    question: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)
    path: PathName | None = Field(None, description=" | ".join(AnswerPath) + "; default: the server's (finetuned-rag "
                                  "with the shipped adapter on the packaged decoder, else rag).")
    history: list[TurnIn] = Field(default_factory=list, max_length=MAX_HISTORY_TURNS,
                                  description="Earlier turns of the conversation, oldest first, for a follow-up.")
    k: int | None = Field(None, ge=1, le=MAX_CHUNKS, description="Chunks in the prompt (default: RAG_ANSWER_CHUNKS).")
    retriever: RetrieverName = RetrieverKind.HYBRID.value
    source: str | None = Field(None, min_length=1, max_length=MAX_SOURCE_PATTERN_CHARS,
                               description="Only retrieve from sources matching this glob, e.g. '*.pdf'.")
    extract: bool = Field(True, description="Align the answer to the best-matching span of its sources.")
    stream: bool = Field(False, description="Server-Sent Events: `token` events, then one `answer` event.")
    collection: CollectionName = None

    _question = field_validator("question")(_not_blank)

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"question": "How do I set a timeout on a client?", "path": "rag", "k": 5, "max_new_tokens": 32}]})


class CitationOut(BaseModel):
    number: int
    chunk_id: int | None
    source: str
    page: int | None
    heading: str | None
    snippet: str


class EvidenceOut(BaseModel):
    """`rag.evidence.Evidence`: a quoted span of one source; `chunk.text[start:end] == quote`."""

    number: int = Field(description="The [n] of the source in `sources` it is quoted from.")
    chunk_id: int | None
    doc_id: str
    source: str
    page: int | None = Field(description="The page of the quoted words.")
    start: int
    end: int
    quote: str
    kind: str = Field(description="'row' (a table row), 'sentence' or 'code'.")
    header: str = Field(description="A row's table caption and column header rows ('' for other kinds).")
    score: float
    readable: str = Field(description="The quote as a reader takes it in: a row as 'label: value (column); ...'.")


class AnswerOut(BaseModel):
    """`Answer.to_dict()`: the same fields as `rag ask --json` (tests/test_architecture.py holds them equal)."""

    answer: str
    path: PathName
    citations: list[CitationOut]
    sources: list[CitationOut] = Field(description="Every source the prompt held, cited or not.")
    usage: dict[str, int]
    timings: dict[str, float]
    raw_text: str = Field(description="The decoder's own words, before alignment to a source span.")
    finish_reason: str = Field(description="'stop' (end of turn or a stop sequence) or 'length' (max_new_tokens).")
    answerable: bool = Field(description="False when the sources do not hold the answer (then no citations).")
    confidence: float | None = Field(description="Calibrated probability that the sources hold the answer.")
    see_also: list[CitationOut] = Field(description="The closest sources of an unanswerable question.")
    searched: str | None = Field(description="The standalone question retrieval used for a follow-up.")
    evidence: list[EvidenceOut] = Field(description="Quoted spans of the sources that answer the question, best "
                                        "first.")
    supported: bool | None = Field(description="Whether the figures and names of the answer are found in its "
                                   "evidence or cited sources (false: shown without citations; null: nothing to "
                                   "check, or the answer is the evidence itself).")


class SearchRequest(Strict):
    query: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)
    k: int = Field(DEFAULT_SEARCH_RESULTS, ge=1, le=MAX_CHUNKS)
    retriever: RetrieverName = RetrieverKind.HYBRID.value
    source: str | None = Field(None, min_length=1, max_length=MAX_SOURCE_PATTERN_CHARS)
    collection: CollectionName = None

    _query = field_validator("query")(_not_blank)


class Passage(BaseModel):
    """A chunk as clients see it: where it is (its document's name, never a server path) and its text."""

    doc_id: str
    source: str
    page: int | None
    page_end: int | None = Field(None, description="The last page the passage covers, when it runs past `page`.")
    heading: str | None
    text: str


class SearchHit(Passage):
    """`ScoredChunk.to_dict()`: the same fields as each hit of `rag search --json`."""

    rank: int
    score: float
    chunk_id: int | None
    scores: dict[str, float] = Field(description="Per-retriever scores that fed a fused result.")


class SearchResponse(BaseModel):
    query: str
    collection: str
    retriever: RetrieverName
    results: list[SearchHit]
    timings: dict[str, float]


class DocumentOut(BaseModel):
    doc_id: str
    collection: str
    source: str
    content_hash: str
    size: int
    chunk_count: int
    ingested_at: str
    warnings: list[str] = Field(default_factory=list, description=(
        "What of the file is not in the index or was read by a guess (pages without a text layer, a guessed "
        "encoding), from the ingest that added it."))


class DocumentList(BaseModel):
    collection: str
    documents: list[DocumentOut]
    counts: dict[str, int]
    snapshot: str


class DeletedDocument(BaseModel):
    doc_id: str
    source: str
    deleted: bool = True


class FileOutcomeOut(BaseModel):
    filename: str
    source: str
    status: str
    chunks: int
    error: str | None
    doc_id: str | None
    duplicate_of: str | None = Field(None, description="Status duplicate: the document that already holds these "
                                     "bytes (not indexed again; RAG_KEEP_DUPLICATES=true indexes both).")
    warnings: list[str] = Field(default_factory=list, description="An ingested file's content that was not indexed "
                                "(pages that are images without a text layer) or was read by a guess (the encoding "
                                "of a text file that is not UTF-8).")


class JobOut(BaseModel):
    id: str
    collection: str
    status: Literal["queued", "running", "succeeded", "partial", "failed"] = Field(
        description="partial: some files failed (see each file's error) and the others were ingested.")
    files: list[FileOutcomeOut]
    progress: dict[str, int]
    created_at: str
    started_at: str | None
    finished_at: str | None
    snapshot: str | None
    error: str | None
    index: dict[str, int]
    attempts: int = Field(description="Runs started; with RAG_STORE_URL a failed or abandoned run is retried by "
                          "a worker until RAG_JOB_MAX_ATTEMPTS.")


class JobAccepted(BaseModel):
    job_id: str
    collection: str
    status: str
    files: list[str]
    status_url: str


# ---------------------------------------------------------------- OpenAI-compatible chat completions
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields this server does not use (user, logprobs, ...): ignored, not refused.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=100, description="rag | rag-prompt-only | rag-finetuned | "
                       "rag-finetuned-rag")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=REQUEST_MAX_SEED)
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=REQUEST_MAX_STOP_SEQUENCES)] | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    # Extensions (send with the openai client as extra_body={...})
    k: int | None = Field(None, ge=1, le=MAX_CHUNKS)
    retriever: RetrieverName = RetrieverKind.HYBRID.value
    source: str | None = Field(None, min_length=1, max_length=MAX_SOURCE_PATTERN_CHARS)
    top_k: int | None = Field(None, ge=1, le=REQUEST_MAX_TOP_K)
    collection: CollectionName = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rag-service"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    reason: str | None = Field(None, description="Why the server is not ready, in plain words (null when ready).")
    checks: dict[str, Any] = Field(default_factory=dict, description="Details for an admin key (or with auth off).")


# ---------------------------------------------------------------- API keys (admin keys only)
class KeyCreate(Strict):
    name: str = Field("", max_length=MAX_NAME, description="A label for people (who or what uses the key).")
    collection: str | None = Field(None, min_length=1, max_length=MAX_COLLECTION_NAME,
                                   description=f"{COLLECTION_HELP} '{ALL_COLLECTIONS}': every collection.")
    role: RoleName = Field(Role.READ.value, description="read: search and ask; write: also upload and delete; "
                           "admin: also manage keys.")


class KeyOut(BaseModel):
    """`ApiKeyRecord.to_dict()`: the same fields as `rag keys list --json`."""

    id: str
    name: str
    collection: str
    role: RoleName
    created_at: str
    revoked_at: str | None


class KeyCreated(KeyOut):
    secret: str = Field(description="The key to send; shown this once (only its SHA-256 digest is stored).")


class KeyList(BaseModel):
    keys: list[KeyOut]


# ---------------------------------------------------------------- passages and evaluation reports (web app)
class PassageOut(Passage):
    """GET /v1/chunks/{id}: the whole passage a citation points at."""

    chunk_id: int


class EvalOut(BaseModel):
    name: str
    title: str = Field(description="The report's first heading.")
    modified_at: str
    files: list[str] = Field(description="Files of the report that GET /v1/evals/{name}/{file} serves.")


class EvalList(BaseModel):
    evals: list[EvalOut]
