"""PDF text layer → elements, with pypdfium2: lines in reading order, headings, tables as Markdown with their header.

Why pypdfium2: PDFium (Chrome's PDF engine, BSD/Apache) reads text layers ~50x faster than pdfminer, which
unstructured's "fast" strategy uses (1.7 pages/s on 2 cores), opens owner-password PDFs and files past pypdf's
limits, and gives every character's box, from which lines, columns and font sizes are rebuilt here.
PyMuPDF would do the same but is AGPL; pdfplumber has table finding but sits on pdfminer (slow).

Layout recovery, per page, from the lines `ingest/pdf_text.py` reads: lines → blocks. A run of lines with several
gapped cells, most of them numeric, is a table; the multi-cell lines right above its first row are its header, the
short lines (and a sentence ending "as follows:") above those its caption, also when they end the page before.
Lines repeated at the same place on most pages (running headers, page numbers) are page furniture and dropped.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingest.ocr import OcrOptions, unavailable
from ingest.pdf_text import NUMERIC, Line, PageText, PdfError, Segment, open_pdf, read_pages

PARSER_VERSION = "pdfium-layout-7"
YEAR = re.compile(r"^(fiscal\s+)?(19|20)\d\d$", re.I)
FURNITURE_BAND = 0.08  # top and bottom share of the page where running headers and page numbers sit
# A table's caption: the short lines right above it on its page ("CONSOLIDATED BALANCE SHEETS", "(In millions)",
# "Assets"), at most this many, each at most CAPTION_WORDS words. They name what the rows are, so every chunk of
# the table repeats them with its header rows.
CAPTION_LINES = 6
CAPTION_WORDS = 14
# The sentence that introduces a table ("Gross margin ... were as follows (dollars in millions):") names what it is
# and its unit: kept with the table, up to this many words.
LEAD_IN_WORDS = 60
# Label-only lines a table's rows may have between them: statements nest group labels ("Other comprehensive income
# (loss), net of taxes:" above "Available-for-sale securities:"), two deep in the filings, three with a margin.
GROUP_LABELS = 3
# Headings are set at least this large relative to the body font: in the 30 FinanceBench filings, 29 of the 31
# emphasised lines under it (0.80-0.89 of the body size) were column labels or signatures, not sections.
HEADING_MIN_SIZE = 0.9
# A name ending in a legal form or kind of body ("ACME HOLDINGS INC.", "Foo and Subsidiary Companies").
ORGANISATION = re.compile(r"\b(inc|incorporated|corporation|corp|company|companies|subsidiaries|co|ltd|limited|plc|llc|"
                          r"l\.?p|n\.?v|s\.?a|ag|se|group|holdings|university|institute|agency|department|board|"
                          r"association)\b\.?$", re.I)
ORGANISATION_WORDS = 8  # at most, in a line that is just a name ("JOHNSON & JOHNSON AND SUBSIDIARIES")
# A caption line that names its table without being set as a heading: a few capitalised words, no figures
# ("Consolidated Statements of Earnings" in the body font).
NAME_LINE = re.compile(r"^[A-Z][\w'’&-]*(?:,?\s+(?:[A-Z][\w'’&-]*|of|and|the|in|for|to|on|or|from))+$")
@dataclass(slots=True)
class PageElement:
    text: str
    category: str  # Title, NarrativeText or Table
    page: int  # 1-based
    header: str = ""  # tables: the caption and Markdown header rows every chunk of the table repeats
    heading: str = ""  # tables: the heading found in the caption, which the table and what follows sit under
    cells: bool = False  # one line of cells set apart ("Fiscal  Fiscal  % Change"): column labels, never a name
    page_end: int | None = None  # tables: the page its rows are on when its caption ends the page before

    @property
    def caption(self) -> str:
        """A table's caption lines: its header without the Markdown header rows."""
        return "\n".join(line for line in self.header.split("\n") if line and not line.startswith("|"))


@dataclass(slots=True)
class ParsedPdf:
    elements: list[PageElement] = field(default_factory=list)
    pages: int = 0
    scanned_pages: list[int] = field(default_factory=list)  # 1-based: images without a text layer, not indexed
    scanned_reason: str = ""  # why those pages are not indexed (OCR off or missing, nothing recognised, ...)
    ocr_pages: dict[int, float] = field(default_factory=dict)  # 1-based page read by OCR → its confidence (0-1)
    metadata_title: str = ""
    metadata_author: str = ""


def _is_table_row(line: Line) -> bool:
    cells = line.segments
    if all(YEAR.match(cell.text) for cell in cells[1:]):  # "(in millions) 2016 2015 2014" heads columns
        return False
    numeric = sum(1 for cell in cells[1:] if NUMERIC.match(cell.text))
    return len(cells) >= 3 and numeric >= 2 or len(cells) == 2 and numeric == 1 and len(cells[0].text) > 2


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def _table(header_lines: list[Line], rows: list[Line], page: int) -> PageElement:
    """Markdown table: header lines folded into one header row, cells placed under the data columns."""
    widest = max(rows, key=lambda line: len(line.segments))
    columns = [(cell.x0, cell.x1) for cell in widest.segments]

    def column_of(segment: Segment) -> int:
        centre = (segment.x0 + segment.x1) / 2
        return min(range(len(columns)),
                   key=lambda i: 0 if columns[i][0] <= centre <= columns[i][1]
                   else min(abs(centre - columns[i][0]), abs(centre - columns[i][1])))

    header = [""] * len(columns)
    for line in header_lines:
        for segment in line.segments:
            index = column_of(segment)
            header[index] = f"{header[index]} {segment.text}".strip()
    body = []
    for line in rows:
        cells = [""] * len(columns)
        for position, segment in enumerate(line.segments):
            index = 0 if position == 0 else column_of(segment)  # a row's first cell is its label
            cells[index] = f"{cells[index]} {segment.text}".strip()
        body.append(_markdown_row(cells))
    header_text = ""
    if any(header):
        header_text = _markdown_row(header) + "\n" + _markdown_row(["---"] * len(columns))
    return PageElement("\n".join(body), "Table", page, header=header_text)


def _captioned(table: PageElement, elements: list[PageElement]) -> PageElement:
    """The table with the short lines right above it (taken off `elements`: this page's so far, or the end of the
    page before for a table that starts a page) as its caption, a sentence introducing it ("... as follows:") too."""
    caption: list[PageElement] = []
    if (elements and elements[-1].category == "NarrativeText" and elements[-1].text.endswith(":")
            and len(elements[-1].text.split()) <= LEAD_IN_WORDS):
        caption.append(elements.pop())
    while (elements and len(caption) < CAPTION_LINES and elements[-1].category != "Table"
           and len(elements[-1].text.split()) <= CAPTION_WORDS
           and (not elements[-1].text.endswith((".", ":", ";")) or len(elements[-1].text.split()) <= 3)):
        caption.insert(0, elements.pop())
    if caption:
        lines = "\n".join(element.text for element in caption)
        table.header = f"{lines}\n{table.header}" if table.header else lines
        table.heading = _caption_heading(caption) or table.heading
    return table


def _continued(table: PageElement, before: list[PageElement]) -> None:
    """A table that starts a page, joined to what ends the page before (`before`, that page's elements): the rest of
    a table continued overleaf takes that table's caption (and its header rows when it repeats none); otherwise the
    caption lines ending that page are moved to the table, which then covers both pages."""
    if before and before[-1].category == "Table":
        previous = before[-1]
        if not table.caption:
            own_rows = table.header
            table.header = previous.header if not own_rows else "\n".join(filter(None, (previous.caption, own_rows)))
            table.heading = table.heading or previous.heading
        return
    count = len(before)
    _captioned(table, before)
    if len(before) < count:
        table.page_end, table.page = table.page, table.page - 1


def names_organisation(text: str) -> bool:
    """A short line that is an organisation's name ("ADOBE SYSTEMS INCORPORATED"): who, not which section."""
    return len(text.split()) <= ORGANISATION_WORDS and bool(ORGANISATION.search(text))


def _caption_heading(caption: list[PageElement]) -> str:
    """The heading a table's caption gives it: its first heading line that is not the organisation's name (a
    statement is often captioned "ACME INC." above "CONSOLIDATED BALANCE SHEETS"), else its first line that reads
    as a name; else its first heading line, if any."""
    titles = [element.text for element in caption if element.category == "Title"]
    named = [element.text for element in caption
             if NAME_LINE.match(element.text) and len(element.text.split()) <= 8 and not element.cells]
    return next((text for text in titles + named if not names_organisation(text)), titles[0] if titles else "")


def _is_row_label(text: str) -> bool:
    """A label-only line inside a table: short, or a group label ending in a colon ("Adjustments to reconcile net
    income to net cash provided by operating activities:" is 81 characters)."""
    return len(text) < 80 or text.endswith(":") and len(text) < 160


def _group_labels(lines: list[Line], index: int, body_size: float) -> int:
    """How many label-only lines from `index` lead to a further row of the table (0: the table ends there). One label
    may look like a heading (a bold "Revenue"); of several, none may: a heading and its subtitle start a new part."""
    count = 0
    while (count < GROUP_LABELS and index + count < len(lines) and len(lines[index + count].segments) == 1
           and _is_row_label(lines[index + count].text)):
        count += 1
        if index + count < len(lines) and _is_table_row(lines[index + count]):
            labels = lines[index:index + count]
            return count if count == 1 or not any(_is_heading(line, body_size) for line in labels) else 0
    return 0


def _table_spans(lines: list[Line], body_size: float) -> list[tuple[int, int, int]]:
    """(header start, first row, last row) of each table: runs of rows, label-only lines between rows included,
    with up to 4 lines of column headings above (`_heads_columns`)."""
    spans, index = [], 0
    while index < len(lines):
        if not _is_table_row(lines[index]):
            index += 1
            continue
        end = index
        while end + 1 < len(lines):
            if _is_table_row(lines[end + 1]):
                end += 1
            elif labels := _group_labels(lines, end + 1, body_size):
                end += labels + 1  # the labels and the row they lead to
            else:
                break
        rows = lines[index:end + 1]
        if sum(_is_table_row(row) for row in rows) >= 2:
            multi = [row for row in rows if len(row.segments) > 1]
            label_right = min(row.segments[0].x1 for row in multi)
            values_left = min(row.segments[1].x0 for row in multi)
            floor = spans[-1][2] + 1 if spans else 0
            while index - 1 >= floor and len(lines[index - 1].segments) == 1 \
                    and lines[index - 1].x0 < label_right and lines[index - 1].text.endswith(":"):
                index -= 1  # a group label ("Revenue:") above the first row belongs to the table
            start = index
            while start - 1 >= floor and index - start < 4 and _heads_columns(lines[start - 1], label_right,
                                                                              values_left, body_size):
                start -= 1
            spans.append((start, index, end))
        index = end + 1
    return spans


def _heads_columns(line: Line, label_right: float, values_left: float, body_size: float) -> bool:
    """A line of column headings above a table's rows: its cells over the value columns, but for a first cell that
    heads the row labels ("(in millions)"). Set like a heading, it must start over the values ("Years Ended" in
    bold): a page's title centred above a table does not."""
    cells = line.segments[1:] if len(line.segments) > 1 else line.segments
    over_values = all(cell.x0 > label_right - 2 and (cell.x0 + cell.x1) / 2 > values_left - 10 for cell in cells)
    return over_values and (line.x0 >= values_left - 10 or not _is_heading(line, body_size))


def _is_heading(line: Line, body_size: float) -> bool:
    if len(line.segments) != 1 or not any(char.isalpha() for char in line.text):
        return False
    words = line.text.split()
    numbered = re.match(r"^(item|part|section|article|note)\s+[\dIVX]+[A-Z]?\b", line.text, re.I)
    short = len(words) <= 14 and not line.text.endswith((".", ",", ";", ":"))
    segment = line.segments[0]
    emphasised = segment.size >= body_size * 1.15 or segment.bold or (line.text.isupper() and len(words) >= 2)
    unit_line = line.text.startswith(("(", "$", "%"))  # "(In millions, except per share data)" is not a section
    # Bold text smaller than the body is a table's column label ("Weighted Average", "Years Ended"), not a section.
    small = segment.size < body_size * HEADING_MIN_SIZE
    return emphasised and not unit_line and not small and (short or bool(numbered) and len(words) <= 24)


def _page_elements(lines: list[Line], page: int, body_size: float) -> list[PageElement]:
    elements: list[PageElement] = []
    paragraph: list[Line] = []

    def flush_paragraph():
        if paragraph:
            text = " ".join(line.text for line in paragraph)
            cells = len(paragraph) == 1 and len(paragraph[0].segments) > 1
            elements.append(PageElement(text, "NarrativeText", page, cells=cells))
            paragraph.clear()

    tables = {start: (first, last) for start, first, last in _table_spans(lines, body_size)}
    index = 0
    while index < len(lines):
        if index in tables:
            first, last = tables[index]
            flush_paragraph()
            elements.append(_captioned(_table(lines[index:first], lines[first:last + 1], page), elements))
            index = last + 1
            continue
        line = lines[index]
        if _is_heading(line, body_size):
            flush_paragraph()
            elements.append(PageElement(line.text, "Title", page))
        else:
            if paragraph:
                previous = paragraph[-1]
                gap = previous.bottom - line.top
                if gap > 0.9 * (previous.top - previous.bottom) or len(line.segments) > 1 \
                        or len(previous.segments) > 1:
                    flush_paragraph()
            paragraph.append(line)
        index += 1
    flush_paragraph()
    return elements


def _furniture(pages: list[PageText]) -> set[str]:
    """Line texts (digits masked) found in the top/bottom band of at least half the pages (3 or more)."""
    counts: Counter[str] = Counter()
    for lines, height, *_ in pages:
        seen = {_mask(line.text) for line in lines
                if line.top > height * (1 - FURNITURE_BAND) or line.bottom < height * FURNITURE_BAND}
        counts.update(seen)
    threshold = max(3, len(pages) // 2)
    return {text for text, count in counts.items() if count >= threshold}


def _mask(text: str) -> str:
    return re.sub(r"\d+", "#", text.strip().lower())


def parse_pdf(path: str | Path, map_pages: Callable = map, pages_per_task: int | None = None,
              ocr: OcrOptions | None = None) -> ParsedPdf:
    """Elements of a PDF's text layer, page by page (raises PdfError for unreadable files); scanned pages read by
    OCR as `ocr` says (None: not at all). Pages are read by `map_pages(read_pages, paths, starts, stops, options)`
    in ranges of `pages_per_task` (default: all at once), e.g. a process pool's map; furniture and elements need
    every page, so they are found here."""
    document = open_pdf(str(path))
    try:
        parsed = ParsedPdf(pages=len(document))
        metadata = document.get_metadata_dict(skip_empty=True)
    finally:
        document.close()
    if parsed.pages == 0:
        raise PdfError("PDF has no pages")
    parsed.metadata_title = " ".join(metadata.get("Title", "").split())
    parsed.metadata_author = " ".join(metadata.get("Author", "").split())
    size = pages_per_task or parsed.pages
    starts = range(0, parsed.pages, size)
    stops = [min(start + size, parsed.pages) for start in starts]
    pages = [page for pages in map_pages(read_pages, [str(path)] * len(starts), starts, stops, [ocr] * len(starts))
             for page in pages]
    reasons = dict.fromkeys(page.ocr.failure or "OCR found no text in them" if page.ocr
                            else unavailable(ocr) if ocr else "OCR is off"
                            for page in pages if page.scanned and not page.lines)
    parsed.scanned_reason = "; ".join(reasons)
    if not any(page.lines for page in pages):
        raise PdfError(f"PDF has no text layer on its {parsed.pages} page(s) "
                       f"(scanned image? {parsed.scanned_reason})")
    parsed.scanned_pages = [number for number, page in enumerate(pages, start=1) if page.scanned and not page.lines]
    parsed.ocr_pages = {number: page.ocr.confidence for number, page in enumerate(pages, start=1)
                        if page.ocr and page.lines}
    furniture = _furniture(pages) if len(pages) >= 3 else set()
    previous: list[PageElement] = []
    for number, (lines, height, *_) in enumerate(pages, start=1):
        kept = [line for line in lines if not (
            (line.top > height * (1 - FURNITURE_BAND) or line.bottom < height * FURNITURE_BAND)
            and (_mask(line.text) in furniture or re.fullmatch(r"(page\s*)?\d{1,4}|[ivxl]{1,6}", line.text.strip(), re.I)))]
        # The body font size: the median over characters, so a few large headings do not move it.
        sizes = [line.segments[0].size for line in kept for _ in range(len(line.text))]
        body_size = statistics.median(sizes) if sizes else 10.0
        elements = _page_elements(kept, number, body_size)
        if elements and elements[0].category == "Table":
            _continued(elements[0], previous)
        parsed.elements.extend(previous)
        previous = elements
    parsed.elements.extend(previous)
    return parsed
