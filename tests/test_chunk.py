"""Chunks respect the embedding model's token limit, stay within one document and section, and overlap."""

import pytest

from ingest.chunk import Chunker, ChunkSettings
from ingest.load import Element, load
from tests.conftest import CORPUS


@pytest.fixture(scope="module")
def chunker(embedder):
    return Chunker(embedder.tokenizer, ChunkSettings(chunk_tokens=120, chunk_overlap=20), embedder.max_tokens)


def test_no_chunk_exceeds_the_limit_on_real_documents(chunker, embedder):
    for path in [CORPUS / "httpx" / "api.md", CORPUS / "ntsb" / "20080102X00002.pdf", CORPUS / "formats" / "autogen-paper.docx"]:
        chunks = chunker.chunk(load(path), "doc", str(path))
        assert chunks
        for chunk in chunks:
            # Measured with the model's own tokenizer, special tokens included: nothing would be truncated.
            assert len(embedder.tokenizer.encode(chunk.text)) <= embedder.max_tokens
            assert chunk.tokens <= 120
            assert chunk.tokens == len(embedder.tokenizer.encode(chunk.text, add_special_tokens=False))


def test_headings_stay_with_their_text_and_pages_are_kept(chunker):
    path = CORPUS / "httpx" / "advanced" / "timeouts.md"
    chunks = chunker.chunk(load(path), "doc", str(path))
    default_timeout = [c for c in chunks if c.heading == "Setting a default timeout on a client"]
    assert default_timeout and all(c.text.startswith("Setting a default timeout on a client\n") for c in default_timeout)
    pdf = CORPUS / "ntsb" / "20080102X00002.pdf"
    assert {c.page for c in chunker.chunk(load(pdf), "doc", str(pdf))} >= {1, 2}


def test_long_sections_are_split_with_overlap(chunker):
    sentences = [f"Sentence number {i} talks about topic {i % 7} at some length." for i in range(80)]
    elements = [Element(text=" ".join(sentences), category="NarrativeText", page=3, heading=None)]
    chunks = chunker.chunk(elements, "doc", "long.txt")
    assert len(chunks) > 3
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    first_tail = chunks[0].text.split()[-4:]
    assert " ".join(first_tail) in chunks[1].text  # the overlap carries context across the boundary
    assert all(c.page == 3 and c.doc_id == "doc" for c in chunks)


def test_chunk_size_over_the_model_limit_is_refused(embedder):
    with pytest.raises(ValueError, match="exceeds the embedding model's limit"):
        Chunker(embedder.tokenizer, ChunkSettings(chunk_tokens=400, chunk_overlap=20), embedder.max_tokens)
