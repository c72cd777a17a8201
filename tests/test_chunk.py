"""Chunks respect the embedding model's token limit, carry their document's facts in a context embedded beside them,
and keep table headers."""

import pytest

from ingest.chunk import Chunker, ChunkSettings
from ingest.load import Element, LoadedDocument, load
from tests.conftest import CORPUS
from tests.pdfs import report_with_table, statement_with_caption, statements_as_filers_set_them, table_overleaf


@pytest.fixture(scope="module")
def chunker(embedder):
    return Chunker(embedder.tokenizer, ChunkSettings(chunk_tokens=120, chunk_overlap=20), embedder.max_tokens)


def test_no_chunk_exceeds_the_limit_on_real_documents(chunker, embedder):
    for path in [CORPUS / "httpx" / "api.md", CORPUS / "ntsb" / "20080102X00002.pdf", CORPUS / "formats" / "autogen-paper.docx"]:
        chunks = chunker.chunk(load(path), "doc", str(path))
        assert chunks
        for chunk in chunks:
            # Measured with the model's own tokenizer, special tokens included: nothing is truncated.
            assert len(embedder.tokenizer.encode(chunk.embedded_text)) <= embedder.max_tokens
            assert len(embedder.tokenizer.encode(chunk.embedded_context)) <= embedder.max_tokens
            assert chunk.tokens <= 120
            assert chunk.tokens == len(embedder.tokenizer.encode(chunk.text, add_special_tokens=False))


def test_headings_and_pages_are_in_each_chunks_context(chunker):
    path = CORPUS / "httpx" / "advanced" / "timeouts.md"
    chunks = chunker.chunk(load(path), "doc", str(path))
    default_timeout = [c for c in chunks if c.heading == "Setting a default timeout on a client"]
    assert default_timeout and all("Setting a default timeout on a client" in c.context for c in default_timeout)
    pdf = CORPUS / "ntsb" / "20080102X00002.pdf"
    pdf_chunks = chunker.chunk(load(pdf), "doc", str(pdf))
    assert {c.page for c in pdf_chunks} >= {1, 2}
    assert all(f"p. {c.page}" in c.context for c in pdf_chunks)


def test_the_embedded_and_indexed_context_carries_title_issuer_period_and_section(chunker, embedder, tmp_path):
    path = tmp_path / "northwind_q1-report.pdf"
    path.write_bytes(report_with_table())
    chunks = chunker.chunk(load(path), "doc", str(path))
    table = next(c for c in chunks if "| Operating income | 310 | 260 | 19% |" in c.text)
    for expected in ("Quarterly Report", "northwind q1 report", "Northwind Traders Inc.",
                     "quarterly period ended March 31, 2024", "Results of Operations"):
        assert expected in table.embedded_context and expected in table.indexed_text
    # The page is indexed and cited, not embedded: a number says nothing to the embedder.
    assert "p. 2" in table.indexed_text and "p. 2" not in table.embedded_context and table.page == 2
    assert table.indexed_text.startswith(table.context + "\n") and "| 2024 | 2023 | Change |" in table.text
    # The header row is embedded, the Markdown rule under it is not.
    assert "| --- |" in table.text and "| 2024 | 2023 | Change |" in table.embedded_text
    assert "---" not in table.embedded_text and table.embedded_text.count("\n") == table.text.count("\n") - 1
    assert len(chunks) == 2  # the cover's short lines merged into one chunk, not one chunk per line
    for chunk in chunks:
        assert len(embedder.tokenizer.encode(chunk.embedded_text)) <= embedder.max_tokens


def test_a_split_table_repeats_its_header_in_every_chunk(chunker):
    header = "| Item | 2024 | 2023 |\n| --- | --- | --- |"
    rows = [f"| Line item number {i} of the statement | {i * 1000:,} | {i * 900:,} |" for i in range(40)]
    table = Element(text=header + "\n" + "\n".join(rows), category="Table", page=7, heading="Statement", header=header)
    chunks = chunker.chunk(LoadedDocument([table]), "doc", "statement.pdf")
    assert len(chunks) > 3 and all(c.text.startswith(header + "\n") for c in chunks)
    assert sum(c.text.count("| Line item number") for c in chunks) == 40  # every row once


def test_every_chunk_of_a_split_statement_carries_its_caption(chunker, embedder, tmp_path):
    path = tmp_path / "globex_2023_annual-report.pdf"
    path.write_bytes(statement_with_caption(rows=40))
    chunks = [c for c in chunker.chunk(load(path), "doc", str(path)) if c.page == 2]
    assert len(chunks) > 2
    for chunk in chunks:  # each piece says which statement, in which unit, its rows are from; none is a caption alone
        assert chunk.text.startswith("Globex Corp.\nCONSOLIDATED BALANCE SHEETS\n(In millions)\n|  | 2023 | 2022 |")
        assert "| Balance sheet line item" in chunk.text and chunk.heading == "CONSOLIDATED BALANCE SHEETS"
        assert len(embedder.tokenizer.encode(chunk.embedded_text)) <= embedder.max_tokens
    assert sum(c.text.count("| Balance sheet line item") for c in chunks) == 40


def test_short_lines_before_a_long_element_lead_its_first_piece(chunker):
    name = Element(text="Globex Corp.", category="NarrativeText", page=4, heading=None)
    sentences = " ".join(f"Sentence number {i} talks about topic {i % 7} at some length." for i in range(40))
    chunks = chunker.chunk(LoadedDocument([name, Element(sentences, "NarrativeText", 4, None)]), "doc", "a.txt")
    assert chunks[0].text.startswith("Globex Corp. Sentence number 0") and len(chunks) > 2  # not a one-line chunk


def test_the_context_is_the_documents_card_then_where_the_chunk_is(chunker, tmp_path):
    path = tmp_path / "globex_2023_annual-report.pdf"
    path.write_bytes(statement_with_caption())
    chunks = chunker.chunk(load(path), "doc", str(path))
    cards = {chunk.document_card for chunk in chunks}
    assert cards == {"Annual Report | globex 2023 annual report | Globex Corporation | fiscal year ended December 31, 2023"}
    assert chunks[-1].context.splitlines()[1] == "CONSOLIDATED BALANCE SHEETS | balance sheet | p. 2"


def test_long_sections_are_split_with_overlap(chunker):
    sentences = [f"Sentence number {i} talks about topic {i % 7} at some length." for i in range(80)]
    elements = [Element(text=" ".join(sentences), category="NarrativeText", page=3, heading=None)]
    chunks = chunker.chunk(LoadedDocument(elements), "doc", "long.txt")
    assert len(chunks) > 3
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    first_tail = chunks[0].text.split()[-4:]
    assert " ".join(first_tail) in chunks[1].text  # the overlap carries context across the boundary
    assert all(c.page == 3 and c.doc_id == "doc" for c in chunks)


def test_chunk_size_over_the_model_limit_is_refused(embedder):
    with pytest.raises(ValueError, match="exceeds the embedding model's limit"):
        Chunker(embedder.tokenizer, ChunkSettings(chunk_tokens=400, chunk_overlap=20), embedder.max_tokens)


def test_a_table_whose_caption_ends_the_page_before_is_one_unit_with_both_pages(chunker, tmp_path):
    path = tmp_path / "initech_q2-report.pdf"
    path.write_bytes(table_overleaf())
    chunks = chunker.chunk(load(path), "doc", str(path))
    lead_in = "Products and services gross margin and gross margin percentage were as follows (dollars in millions):"
    table = [c for c in chunks if "| Gross margin line" in c.text]
    assert table and all(lead_in in c.text and "June 30, 2024" in c.text for c in table)  # caption, unit, periods
    assert (table[0].page, table[0].page_end) == (1, 2)
    assert table[0].heading == "Gross Margin" and "p. 1" in table[0].context
    assert not any(c.text.strip() == lead_in for c in chunks)  # the caption is never a chunk of its own
    total = next(c for c in chunks if "| Total gross margin percentage | 44.3 % | 43.1 % |" in c.text)
    assert lead_in in total.text and "June 30, 2023" in total.text
    # Rows continued onto the third page without a caption of their own take the table's caption and header.
    further = next(c for c in chunks if "| Further margin line 0 |" in c.text)
    assert further.page == 3 and lead_in in further.text and "June 30, 2024" in further.text


def test_financial_statements_are_named_in_the_context_of_their_tables(chunker, tmp_path):
    path = tmp_path / "globex_2023_annual-report.pdf"
    path.write_bytes(statements_as_filers_set_them())
    chunks = chunker.chunk(load(path), "doc", str(path))
    income = next(c for c in chunks if "| Operating income |" in c.text)
    cash = next(c for c in chunks if "| Depreciation |" in c.text)
    assert "income statement" in income.context_fields and "cash flow statement" in cash.context_fields
    assert not any("statement" in field for c in chunks if "|" not in c.text for field in c.context_fields)
