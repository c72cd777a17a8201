"""Limits a file must keep before any parser works on it: its size, what a zip container would inflate to, a
sheet's rows and cells, a PDF's pages, a document's characters, and how deep HTML may nest.

Each is one setting in rag/config.py (`RAG_MAX_*`); a file over one fails with a reason that names the limit, its
value and the setting that raises it, and the rest of the job goes on. The checks read only what is cheap to read:
a zip's central directory (nothing inflated), a sheet's XML counted while streaming (stopping at the limit), a
PDF's page count. What they cannot foresee (a parser that runs away on a file within every limit) is stopped by
the parse worker's time and memory budget (ingest/sandbox.py).

>>> check_file(Path("report.xlsx"), Limits.from_settings(Settings()))  # doctest: +SKIP
Traceback (most recent call last):
LimitError: sheet 'sheet1': 200,001 rows exceed the limit of 100,000 (RAG_MAX_SHEET_ROWS)
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, fields
from html.parser import HTMLParser
from pathlib import Path

from rag.config import Settings

MB = 1 << 20
# Office Open XML and OpenDocument files are zip archives; so is EPUB.
ZIP_SUFFIXES = {".docx", ".pptx", ".xlsx", ".epub", ".odt", ".ods", ".odp"}
# Worksheets are inflated in pieces of this size while their rows and cells are counted.
STREAM_BLOCK = 1 << 20
_ROW = re.compile(rb"<(?:\w+:)?row[\s>/]")
_CELL = re.compile(rb"<(?:\w+:)?c[\s>/]")
_LONGEST_TAG = 16  # bytes kept from the end of one piece, so a tag split across two pieces is counted once
# Elements that never hold others (HTML's void elements): they do not nest.
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
                 "track", "wbr"}
# Elements whose end tag HTML lets authors leave out: a sibling's start tag closes them.
SELF_CLOSING_SIBLINGS = {"p", "li", "dt", "dd", "tr", "td", "th", "option"}


class LimitError(Exception):
    """A file over one of the limits: the message names the limit, its value and the setting that raises it
    (`ingest.load.load` reports it as the file's LoadError)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits among the settings (their values, names and defaults are in rag/config.py), in a form the parse
    workers can be sent."""

    max_file_mb: float
    max_expanded_mb: float
    max_zip_members: int
    max_sheet_rows: int
    max_sheet_cells: int
    max_pdf_pages: int
    max_document_chars: int
    max_nesting_depth: int
    # How scanned pages are read (ingest/ocr.py's OcrOptions), sent to the parse workers with the limits; not
    # among the limits `rag info` lists (OCR_FIELDS).
    ocr: str
    ocr_min_confidence: float
    ocr_page_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(**{field.name: getattr(settings, field.name) for field in fields(cls)})


# The settings a user may need to raise when ingestion stops a file, shown by `rag info`.
BUDGET_SETTINGS = ("parse_timeout_s", "parse_memory_mb")
OCR_FIELDS = ("ocr", "ocr_min_confidence", "ocr_page_timeout_s")


def shown(settings: Settings) -> dict[str, float | int]:
    """Every limit and budget of a file's ingestion by its environment variable, for `rag info`."""
    names = [field.name for field in fields(Limits) if field.name not in OCR_FIELDS] + list(BUDGET_SETTINGS)
    return {env_name(name): getattr(settings, name) for name in names}


def env_name(setting: str) -> str:
    return f"RAG_{setting.upper()}"


def exceeded(amount: float, unit: str, limit: float, setting: str, where: str = "") -> LimitError:
    """The error of a file over a limit, e.g. "sheet 'sheet1': 200,001 rows exceed the limit of 100,000
    (RAG_MAX_SHEET_ROWS)"."""
    prefix = f"{where}: " if where else ""
    limit_unit = " MB" if unit.startswith("MB") else ""
    return LimitError(f"{prefix}{_number(amount)} {unit} exceed the limit of {_number(limit)}{limit_unit} "
                      f"({env_name(setting)})")


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def check_size(size: int, limits: Limits) -> None:
    """Bytes per file: checked from the file's size, before it is hashed or read."""
    if size > limits.max_file_mb * MB:
        raise exceeded(size / MB, "MB", limits.max_file_mb, "max_file_mb")


def check_file(path: Path, limits: Limits) -> None:
    """Every limit that can be judged before parsing: size; a zip container's expanded size and members; a
    spreadsheet's rows and cells; a PDF's pages; a text file's characters (where its size alone shows it)."""
    check_size(path.stat().st_size, limits)
    suffix = path.suffix.lower()
    if suffix in ZIP_SUFFIXES:
        check_zip(path, limits)
        if suffix == ".xlsx":
            check_sheets(path, limits)
    elif suffix == ".pdf":
        from ingest.pdf_text import page_count

        pages = page_count(path)
        if pages > limits.max_pdf_pages:
            raise exceeded(pages, "pages", limits.max_pdf_pages, "max_pdf_pages")


def check_zip(path: Path, limits: Limits) -> None:
    """Expanded bytes and members of a zip container, from its central directory: a small file that would inflate
    to gigabytes (a zip bomb) is refused before anything is inflated. A file that is not a valid zip is left to
    its parser, which says what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return
    if len(members) > limits.max_zip_members:
        raise exceeded(len(members), "archive members", limits.max_zip_members, "max_zip_members")
    expanded = sum(member.file_size for member in members)
    if expanded > limits.max_expanded_mb * MB:
        raise exceeded(expanded / MB, "MB expanded", limits.max_expanded_mb, "max_expanded_mb")


def check_sheets(path: Path, limits: Limits) -> None:
    """Rows and cells of each worksheet of an .xlsx, counted while its XML streams (within the expanded-size limit
    checked first) and stopping at the limit, so a sheet of millions of rows costs only the reading up to it. A
    sheet's declared dimension is not trusted: a file may state any."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        for member in archive.infolist():
            if not (member.filename.startswith("xl/worksheets/") and member.filename.endswith(".xml")):
                continue
            rows = cells = 0
            tail = b""
            with archive.open(member) as sheet:
                while block := sheet.read(STREAM_BLOCK):
                    text = tail + block
                    rows += len(_ROW.findall(text)) - len(_ROW.findall(tail))
                    cells += len(_CELL.findall(text)) - len(_CELL.findall(tail))
                    tail = text[-_LONGEST_TAG:]
                    where = f"sheet '{Path(member.filename).stem}'"
                    if rows > limits.max_sheet_rows:
                        raise exceeded(rows, "rows", limits.max_sheet_rows, "max_sheet_rows", where)
                    if cells > limits.max_sheet_cells:
                        raise exceeded(cells, "cells", limits.max_sheet_cells, "max_sheet_cells", where)


def check_text_size(size: int, limits: Limits) -> None:
    """A text file of more bytes than four per allowed character holds too many characters, whatever its
    encoding: refused before it is read."""
    if size > 4 * limits.max_document_chars:
        raise LimitError(f"{_number(size)} bytes of text hold more than the limit of "
                         f"{_number(limits.max_document_chars)} characters ({env_name('max_document_chars')})")


def check_chars(chars: int, limits: Limits) -> None:
    if chars > limits.max_document_chars:
        raise exceeded(chars, "characters", limits.max_document_chars, "max_document_chars")


class _Flattener(HTMLParser):
    """Re-writes HTML with the tags nested deeper than `max_depth` left out and everything they hold kept: HTML
    parsers stop at a depth of their own (libxml2, below unstructured: 255) and drop the content beyond it."""

    def __init__(self, max_depth: int):
        super().__init__(convert_charrefs=False)
        self.max_depth = max_depth
        self.out: list[str] = []
        self.open: list[str] = []  # tag names, outermost first (those beyond max_depth too: their end tags go)
        self.deepest = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in VOID_ELEMENTS:
            self.out.append(self.get_starttag_text() or "")
            return
        if tag in SELF_CLOSING_SIBLINGS and self.open and self.open[-1] == tag:
            self.handle_endtag(tag)
        self.open.append(tag)
        self.deepest = max(self.deepest, len(self.open))
        if len(self.open) <= self.max_depth:
            self.out.append(self.get_starttag_text() or "")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.out.append(self.get_starttag_text() or "")

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.open:  # a stray end tag: browsers ignore it
            return
        while self.open:
            depth, closed = len(self.open), self.open.pop()
            if depth <= self.max_depth:
                self.out.append(f"</{closed}>")
            if closed == tag:
                return

    def handle_data(self, data: str) -> None:
        self.out.append(data)

    def handle_entityref(self, name: str) -> None:
        self.out.append(f"&{name};")

    def handle_charref(self, name: str) -> None:
        self.out.append(f"&#{name};")

    def handle_comment(self, data: str) -> None:
        self.out.append(f"<!--{data}-->")

    def handle_decl(self, decl: str) -> None:
        self.out.append(f"<!{decl}>")

    def handle_pi(self, data: str) -> None:
        self.out.append(f"<?{data}>")

    def unknown_decl(self, data: str) -> None:
        self.out.append(f"<![{data}]>")


def flatten_deep_html(html: str, limits: Limits) -> tuple[str, str | None]:
    """`html` unchanged when it nests no deeper than the limit; else re-written with the deeper tags left out (their
    text kept, under the element at the limit) and a warning that says so."""
    if html.count("<") <= limits.max_nesting_depth:  # too few tags to nest that deep: skip the scan
        return html, None
    flattener = _Flattener(limits.max_nesting_depth)
    flattener.feed(html)
    flattener.close()
    if flattener.deepest <= limits.max_nesting_depth:
        return html, None
    warning = (f"HTML nested {flattener.deepest:,} elements deep: the elements below a depth of "
               f"{limits.max_nesting_depth:,} ({env_name('max_nesting_depth')}) were merged into the one above them; "
               "their text is indexed, their structure (headings, lists, tables) may be lost")
    return "".join(flattener.out), warning
