"""Every supported format yields real text with its metadata; bad files fail with a reason."""

from pathlib import Path

import pytest

from ingest.load import LoadError, load
from tests.conftest import CORPUS, DATA
from tests.pdfs import (column_labels_as_filers_set_them, notes_as_filers_set_them, report_with_scanned_pages,
                        report_with_table, scan_without_text, statement_with_caption, statements_as_filers_set_them)


@pytest.mark.parametrize(
    ("path", "expected_text"),
    [
        (CORPUS / "httpx" / "quickstart.md", "httpx.get"),
        (CORPUS / "ntsb" / "20071229X02007.pdf", "National Transportation Safety Board"),
        (CORPUS / "formats" / "autogen-paper.docx", "AutoGen"),
        (CORPUS / "formats" / "wikipedia-microsoft.html", "Microsoft"),
        (DATA / "test_with_comment.docx", ""),
        (DATA / "test_blog.html", ""),
        (DATA / "test.xlsx", ""),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_each_format_yields_real_text(path: Path, expected_text: str):
    elements = load(path).elements
    text = " ".join(element.text for element in elements)
    assert len(text) > 50, f"{path.name} gave almost no text"
    assert expected_text in text


def test_pdf_with_owner_password_yields_text_and_page_numbers():
    # The fast strategy returns zero elements without raising when it cannot decrypt; this must not happen.
    elements = load(CORPUS / "ntsb" / "20071229X02007.pdf").elements
    assert len(elements) > 20
    pages = {element.page for element in elements}
    assert pages >= {1, 2}


def test_markdown_elements_carry_their_heading():
    elements = load(CORPUS / "httpx" / "advanced" / "timeouts.md").elements
    assert elements[0].heading is None  # the file opens with text, before its first heading
    assert any(e.heading == "Setting and disabling timeouts" for e in elements)
    assert any(e.heading == "Setting a default timeout on a client" for e in elements)
    assert {e.category for e in elements} >= {"Title", "NarrativeText"}


def test_scanned_pdf_without_text_layer_is_an_error_not_silence(tmp_path: Path):
    (tmp_path / "blank.pdf").write_bytes(scan_without_text())  # grey images: OCR finds nothing in them either
    with pytest.raises(LoadError, match="no text layer on its 2 page"):
        load(tmp_path / "blank.pdf")


def test_scanned_pages_among_typed_ones_are_reported_and_the_typed_ones_load(tmp_path: Path):
    (tmp_path / "report.pdf").write_bytes(report_with_scanned_pages())
    document = load(tmp_path / "report.pdf")
    assert {element.page for element in document.elements} == {1, 3}
    [warning] = document.warnings
    assert warning.startswith("2 of 4 pages are page-sized images without a text layer") and warning.endswith(
        "page 2, 4")
    (tmp_path / "table.pdf").write_bytes(report_with_table())  # typed pages only: nothing to say
    assert load(tmp_path / "table.pdf").warnings == ()


def test_a_pdf_that_ingest_pdf_fails_on_is_read_by_unstructured_with_a_warning(tmp_path: Path, monkeypatch):
    def fault(*args, **kwargs):  # what a bug of our parser on a file unlike any seen would do
        raise IndexError("list index out of range")

    monkeypatch.setattr("ingest.load.parse_pdf", fault)
    (tmp_path / "report.pdf").write_bytes(report_with_table())
    document = load(tmp_path / "report.pdf")
    assert "Cost of sales" in " ".join(element.text for element in document.elements)
    assert {element.page for element in document.elements} == {1, 2}
    [warning] = document.warnings
    assert warning.startswith("read by unstructured's PDF parser")
    assert warning.endswith("failed on it: IndexError: list index out of range")
    with pytest.raises(LoadError, match="IndexError: list index out of range; then unstructured found no text"):
        load(DATA / "MEDRPT-2024-PAT-3847_medical_report_scan.pdf")


def test_pdf_table_rows_come_with_their_header_and_headings_are_found(tmp_path: Path):
    (tmp_path / "report.pdf").write_bytes(report_with_table())
    elements = load(tmp_path / "report.pdf").elements
    table = next(e for e in elements if e.category == "Table")
    assert table.page == 2 and table.heading == "Results of Operations"
    assert table.header.splitlines()[0] == "|  | 2024 | 2023 | Change |"
    assert table.text.startswith(table.header)
    assert "| Cost of sales | 700 | 640 | 9% |" in table.text.splitlines()
    titles = [e.text for e in elements if e.category == "Title"]
    assert titles == ["Quarterly Report", "Results of Operations"]  # larger or bold lines; body lines are not


def test_a_pdf_tables_caption_lines_head_it_and_name_its_section(tmp_path: Path):
    (tmp_path / "annual.pdf").write_bytes(statement_with_caption())
    elements = load(tmp_path / "annual.pdf").elements
    table = next(e for e in elements if e.category == "Table")
    # The issuer's name, the statement's title and its unit line sit right above the rows: they are its caption.
    assert table.header.startswith("Globex Corp.\nCONSOLIDATED BALANCE SHEETS\n(In millions)\n|  | 2023 | 2022 |")
    assert table.heading == "CONSOLIDATED BALANCE SHEETS"
    assert not any(e.page == 2 and e.category != "Table" for e in elements)  # no caption line left on its own
    assert "(In millions)" not in [e.text for e in elements if e.category == "Title"]  # a unit line is no section


def test_a_tables_heading_is_the_statement_its_caption_names(tmp_path: Path):
    (tmp_path / "statements.pdf").write_bytes(statements_as_filers_set_them())
    elements = load(tmp_path / "statements.pdf").elements
    income, cash = [e for e in elements if e.category == "Table"]
    # under the statement's title, not the issuer's name set as a heading above it
    assert income.heading == "CONSOLIDATED STATEMENTS OF INCOME"
    assert income.header.startswith("GLOBEX CORPORATION\nCONSOLIDATED STATEMENTS OF INCOME\n(In millions)")
    # a title in the body font names its table too, instead of the auditor's report the page before
    assert cash.page == 3 and cash.heading == "Consolidated Statements of Cash Flows"
    # a long group label ending in a colon is a row of the table, not the end of it
    rows = cash.text.splitlines()
    assert "| Net income | 900 | 800 |" in rows and "| Depreciation | 150 | 140 |" in rows
    assert any(row.startswith("| Adjustments to reconcile net income") for row in rows)
    assert not any(e.page == 3 and e.category != "Table" for e in elements)
    # bold but smaller than the body: a label, not a section (what follows stays under the report)
    assert {e.heading for e in elements if e.page == 2} == {"Report of Independent Registered Public Accounting Firm"}


def test_column_labels_stay_in_their_table_and_never_head_it(tmp_path: Path):
    (tmp_path / "labels.pdf").write_bytes(column_labels_as_filers_set_them())
    elements = load(tmp_path / "labels.pdf").elements
    comprehensive, segments = [e for e in elements if e.category == "Table"]
    # one table: "Years Ended" and the "(in millions)" line head its columns; two nested group labels do not end it
    assert comprehensive.header.splitlines()[-2] == "| (in millions) | Years Ended 2023 | 2022 |"
    assert comprehensive.heading == "CONSOLIDATED STATEMENTS OF COMPREHENSIVE INCOME"
    rows = comprehensive.text.splitlines()
    assert "| Net income | 900 | 800 |" in rows and "| Total comprehensive income | 915 | 791 |" in rows
    assert "| Available-for-sale securities: |  |  |" in rows
    assert not any(e.page == 1 and e.category != "Table" for e in elements)
    # label cells left above a table are in its caption but are not its name: it stays under its section
    assert "Fiscal Fiscal" in segments.header and segments.heading == "Segment Results"


def test_a_heading_in_a_bold_font_of_no_stated_weight_heads_the_pages_after_the_issuers_name(tmp_path: Path):
    (tmp_path / "notes.pdf").write_bytes(notes_as_filers_set_them())
    elements = load(tmp_path / "notes.pdf").elements
    assert "Merchandise Inventories" in [e.text for e in elements if e.category == "Title"]
    # the issuer's name atop the next page is no section: the note goes on under its heading
    continued = next(e for e in elements if e.text.startswith("Our inventory valuation"))
    assert continued.page == 2 and continued.heading == "Merchandise Inventories"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.md", b"", "empty file"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20, "binary content"),
        ("garbage.txt", bytes(range(128, 256)) * 40, "not valid UTF-8"),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage", "corrupt PDF"),
        ("truncated.docx", b"PK\x03\x04 not really a zip", "not a ZIP archive"),
        ("data.xyz", b"some data", "unsupported file type '.xyz'"),
    ],
)
def test_bad_input_is_reported_with_a_reason(tmp_path: Path, name: str, content: bytes, reason: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoadError, match=reason):
        load(path)


def test_latin1_text_is_decoded_not_rejected(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café crème brûlée, naïve façade. Déjà vu à la carte.\n".encode("latin-1") * 5)
    document = load(path)
    assert "Café" in " ".join(element.text for element in document.elements)
    [warning] = document.warnings  # the encoding is a guess: the uploader is told which
    assert warning.startswith("not UTF-8: read as ") and "a guess" in warning
    assert load(CORPUS / "httpx" / "quickstart.md").warnings == ()
