"""PDF pages → lines, with pypdfium2: a page's text layer (or, for a scanned page, what OCR reads from its image)
as lines of segments with their positions, sizes and weight, the raw material `ingest/pdf.py` lays out.

Characters → segments (runs of glyphs on one baseline without a wide gap) → lines (segments that overlap
vertically, left to right). Read in worker processes for large files (`read_pages` over page ranges).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ingest.ocr import OcrOptions, OcrPage, garbage, recognise, unavailable
from rag.pages import OCR_DPI, PDFIUM_LOCK

NUMERIC = re.compile(r"^[\s$€£%()\-–—.,:;*/x]*\(?-?[$€£]?\s*\d[\d,.]*\s*%?\)?[\s%*)]*$|^[-–—$]+$")
# A font whose name says it is bold: many filings' fonts ("Times New Roman,Bold") do not state a weight, which PDFium
# then reports as 0 or -1.
BOLD_FONT_NAME = re.compile(rb"bold|black|heavy", re.I)
# A page with fewer characters of text than this (or a garbage text layer) under an image covering at least this
# share of it is a scanned page (a stamp or page number aside), whose words only OCR finds (ingest/ocr.py).
SCANNED_PAGE_CHARS = 20
SCANNED_IMAGE_SHARE = 0.5


class PdfError(Exception):
    """The PDF cannot be read; the message says why."""


@dataclass(slots=True)
class Segment:
    x0: float
    x1: float
    bottom: float
    top: float
    text: str
    size: float  # font size of its first glyph
    bold: bool


@dataclass(slots=True)
class Line:
    segments: list[Segment]
    bottom: float
    top: float

    @property
    def text(self) -> str:
        return " ".join(segment.text for segment in self.segments)

    @property
    def x0(self) -> float:
        return self.segments[0].x0


class PageText(NamedTuple):
    lines: list[Line]
    height: float
    scanned: bool  # a page-sized image and (almost) no text: see SCANNED_PAGE_CHARS
    ocr: OcrPage | None = None  # a scanned page read by OCR: `lines` are what it recognised


def _segments(textpage, raw) -> list[Segment]:
    count = textpage.count_chars()
    if count <= 0:
        return []
    text = textpage.get_text_range(0, count)
    if len(text) != count:  # characters outside the BMP: indexes no longer line up, fall back to a char at a time
        text = "".join(textpage.get_text_range(i, 1)[:1] or " " for i in range(count))
    left, right, bottom, top = (ctypes.c_double() for _ in range(4))
    # This loop is most of a PDF's parse time. The raw handle, not the helper object, spares ctypes an _as_parameter_
    # lookup per call; with no box asked for spaces and no min/max calls, the 30 FinanceBench filings parse in a third
    # less time (one process, best of 3, two runs: 26.5 → 17.2 s and 24.5 → 15.8 s), every element the same.
    handle, char_box = textpage.raw, raw.FPDFText_GetCharBox
    font_name, font_flags = ctypes.create_string_buffer(256), ctypes.c_int()
    segments: list[Segment] = []
    current: list[str] = []
    box = None  # [x0, x1, bottom, top] of the current segment
    start_index = 0
    last_right = 0.0

    def close():
        nonlocal current, box
        if box and "".join(current).strip():
            size = raw.FPDFText_GetFontSize(handle, start_index)
            bold = raw.FPDFText_GetFontWeight(handle, start_index) >= 600 or bool(
                raw.FPDFText_GetFontInfo(handle, start_index, font_name, len(font_name), ctypes.byref(font_flags))
                and BOLD_FONT_NAME.search(font_name.value))
            segments.append(Segment(box[0], box[1], box[2], box[3], " ".join("".join(current).split()), size, bold))
        current, box = [], None

    for index, char in enumerate(text):
        if char in "\r\n":
            close()
            continue
        blank = char.isspace()
        if not blank:  # a space's box is never used (words are told apart by gaps), so it is not asked for
            char_box(handle, index, left, right, bottom, top)
            x0, x1, y0, y1 = left.value, right.value, bottom.value, top.value
        if blank or x1 <= x0:
            if box is not None:
                current.append(" ")
            continue
        height = y1 - y0 if y1 - y0 > 1.0 else 1.0
        if box is not None:
            mid = (y0 + y1) / 2
            same_line = box[2] - height * 0.3 <= mid <= box[3] + height * 0.3
            gap = x0 - last_right
            if not same_line or gap > 0.9 * (height if height > box[3] - box[2] else box[3] - box[2]) \
                    or gap < -height * 2:
                close()
        if box is None:
            box, start_index = [x0, x1, y0, y1], index
        else:
            if x0 < box[0]:
                box[0] = x0
            if x1 > box[1]:
                box[1] = x1
            if y0 < box[2]:
                box[2] = y0
            if y1 > box[3]:
                box[3] = y1
        current.append(char)
        last_right = x1
    close()
    return segments


def _lines(segments: list[Segment]) -> list[Line]:
    """Segments that overlap vertically form a line; lines top to bottom, segments left to right."""
    lines: list[Line] = []
    for segment in sorted(segments, key=lambda s: (-s.top, s.x0)):
        height = segment.top - segment.bottom
        for line in reversed(lines[-3:]):
            overlap = min(line.top, segment.top) - max(line.bottom, segment.bottom)
            if overlap > 0.5 * min(height, line.top - line.bottom):
                line.segments.append(segment)
                line.bottom, line.top = min(line.bottom, segment.bottom), max(line.top, segment.top)
                break
        else:
            lines.append(Line([segment], segment.bottom, segment.top))
    for line in lines:
        line.segments.sort(key=lambda s: s.x0)
        _merge_currency_cells(line)
    return lines


def _merge_currency_cells(line: Line) -> None:
    """'$' set apart from its number is one cell, not two."""
    merged: list[Segment] = []
    for segment in line.segments:
        if merged and merged[-1].text in {"$", "€", "£", "("} and NUMERIC.match(segment.text):
            previous = merged[-1]
            merged[-1] = Segment(previous.x0, segment.x1, min(previous.bottom, segment.bottom),
                                 max(previous.top, segment.top), previous.text + segment.text, segment.size,
                                 segment.bold)
        else:
            merged.append(segment)
    line.segments = merged


def open_pdf(path: str):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(path)
    except pdfium.PdfiumError as error:
        if "password" in str(error).lower():
            raise PdfError("PDF needs a password to open") from None
        raise PdfError(f"corrupt PDF: {error}") from None


def page_count(path: str | Path) -> int:
    """Pages of a PDF; 0 where it cannot be opened (parsing it then reports why). Called in the job's own process,
    which may be the API's: under the process's PDFium lock."""
    with PDFIUM_LOCK:
        try:
            document = open_pdf(str(path))
        except PdfError:
            return 0
        try:
            return len(document)
        finally:
            document.close()


def _has_page_sized_image(page, raw) -> bool:
    """An image covering at least half the page: what a scanner makes (not a logo on an otherwise blank page)."""
    width, height = page.get_size()
    for image in page.get_objects(filter=[raw.FPDF_PAGEOBJ_IMAGE], max_depth=2):
        left, bottom, right, top = image.get_bounds()
        covered = (min(right, width) - max(left, 0)) * (min(top, height) - max(bottom, 0))
        if covered >= SCANNED_IMAGE_SHARE * width * height:
            return True
    return False


def _ocr_page(page, options: OcrOptions) -> PageText:
    """A scanned page's lines as OCR reads them from its rendering, in PDF points like a text layer's."""
    result = recognise(page.render(scale=OCR_DPI / 72, grayscale=True).to_pil(), options.page_timeout_s)
    scale, height = 72 / OCR_DPI, page.get_height()
    segments = [Segment(run.left * scale, run.right * scale, height - run.bottom * scale, height - run.top * scale,
                        run.text, run.line_height * scale, False) for run in result.runs]
    return PageText(_lines(segments), height, True, result)


def read_pages(path: str, start: int, stop: int, ocr: OcrOptions | None = None) -> list[PageText]:
    """The text of pages [start, stop) (0-based): the costly part of parsing, mapped over page ranges in worker
    processes for large files (`parse_pdf`'s map_pages); scanned pages read by OCR where `ocr` allows it."""
    import pypdfium2.raw as raw

    document = open_pdf(path)
    try:
        pages = []
        for number in range(start, stop):
            page = document[number]
            textpage = page.get_textpage()
            try:
                lines = _lines(_segments(textpage, raw))
                sample = "".join(line.text for line in lines[:SCANNED_PAGE_CHARS])
                scanned = (len(sample) < SCANNED_PAGE_CHARS or garbage(sample)) and _has_page_sized_image(page, raw)
                if scanned and ocr and not unavailable(ocr):
                    pages.append(_ocr_page(page, ocr))
                else:
                    pages.append(PageText(lines, page.get_height(), scanned))
            finally:
                textpage.close()
                page.close()
        return pages
    finally:
        document.close()
