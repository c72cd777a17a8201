"""A PDF page as a PNG with the quoted words highlighted, so that a reader sees evidence where it stands on the page.

    png = render_page(Path("report.pdf"), page=2, highlight="| Net sales | 1,250 | 1,100 | 14% |")

The quote is found in the page's own text layer with PDFium's search (case-insensitive), which matches across the
line breaks and spacing that ingestion normalised: a table row (Markdown, as evidence quotes it) is searched cell by
cell, its figures kept to the line of its label when the label is found; a sentence is searched whole, else by its
first words (a quote that ran across a page break, or whose ligatures or hyphens the text layer spells otherwise).
Words that cannot be found are simply not highlighted: the page is still the page the evidence names. A scanned page
has no text layer: its words are read by OCR (a `Recogniser` the caller gives) and searched the same way.

PDFium is not thread-safe, so every call into it here holds one process-wide lock; the API renders off its event
loop (api/routes/sources.py) and keeps the PNGs in a `RenderedPages` cache bounded in bytes.
"""

from __future__ import annotations

import bisect
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from rag.errors import NotFoundError, UserError

RENDER_SCALE = 2.0  # 144 dpi: a table's small figures stay legible
MAX_PAGE_WIDTH = 1400  # pixels: the scale drops for wide pages so an image never exceeds these
MAX_PAGE_HEIGHT = 2800
MAX_HIGHLIGHT_CHARS = 1000  # a quote to highlight (evidence sentences are cut at 600; a wide table row fits)
SENTENCE_PREFIX_WORDS = (12, 6)  # when a sentence is not found whole: its first words, fewer each try
MIN_CELL_CHARS = 2  # a one-character cell ("-", "$") would mark every such character on the page
FILL = (255, 200, 0, 90)  # translucent yellow over the words
OUTLINE = (230, 120, 0, 255)
PAGE_CACHE_BYTES = 64 * 1024 * 1024  # rendered PNGs kept in memory by the API (a page is ~100-400 KB)
TABLE_RULE = re.compile(r"^\|(?:\s*:?-{3,}:?\s*\|)+\s*$")

# PDFium is not thread-safe: one call into it at a time in this process (the API renders pages on its threads
# while an upload job counts a file's pages: ingest/pdf_text.page_count takes the same lock).
PDFIUM_LOCK = threading.Lock()

Box = tuple[float, float, float, float]  # left, bottom, right, top in PDF units
Search = Callable[[str], list[list[Box]]]  # every place a text stands on a page, each as its boxes
# Reads a page image (PIL) rendered at the given dpi: its words, each with its box in the image's pixels (left, top,
# right, bottom). Given by the caller (the API passes ingest.ocr.page_words): the library does not run OCR itself.
Recogniser = Callable[[object, float], list[tuple[str, tuple[int, int, int, int]]]]
# Pages are read by OCR at this resolution (ingestion, and highlights on scanned pages): tesseract reads 8-10 pt print
# best around 200-300 dpi, and time grows with pixels; 200 dpi gave a CER of 0-2% on filings (docs/ocr.md).
OCR_DPI = 200


class PageNotFoundError(NotFoundError):
    """The document has no page with this number."""

    code = "page_not_found"


class PageUnreadableError(UserError):
    """The file cannot be opened or rendered as a PDF."""

    code = "page_unreadable"


def render_page(source: Path | bytes, page: int, highlight: str = "", display_name: str = "",
                recognise: Recogniser | None = None) -> bytes:
    """Page `page` (1-based) of the PDF at `source` (a path, or the file's bytes) as PNG bytes, with the words of
    `highlight` boxed. A page without a text layer (a scan) has its words found by `recognise` when given. Errors
    name the file by `display_name` (never its path on the server)."""
    import pypdfium2 as pdfium
    from PIL import Image, ImageDraw

    name = display_name or (source.name if isinstance(source, Path) else "the document")
    scan = None
    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(source)
        except pdfium.PdfiumError as error:
            raise PageUnreadableError(f"'{name}' cannot be opened as a PDF ({error}).") from None
        try:
            if not 1 <= page <= len(document):
                raise PageNotFoundError(f"'{name}' has {len(document)} page(s); there is no page {page}.")
            pdf_page = document[page - 1]
            left, bottom, right, top = pdf_page.get_cropbox()
            width, height = right - left, top - bottom
            scale = min(RENDER_SCALE, MAX_PAGE_WIDTH / max(width, 1), MAX_PAGE_HEIGHT / max(height, 1))
            rotation = pdf_page.get_rotation()
            # Rendered unrotated, so that text boxes (in unrotated page space) map straight onto pixels; turned after.
            image = pdf_page.render(scale=scale, rotation=(360 - rotation) % 360).to_pil().convert("RGB")
            boxes: list[Box] = []
            if highlight.strip():
                textpage = pdf_page.get_textpage()
                if textpage.count_chars() or recognise is None:
                    boxes = find_boxes(text_layer(textpage), highlight)
                else:  # read outside the lock: OCR takes seconds
                    scan = pdf_page.render(scale=OCR_DPI / 72, rotation=(360 - rotation) % 360,
                                           grayscale=True).to_pil()
        except pdfium.PdfiumError as error:
            raise PageUnreadableError(f"Page {page} of '{name}' cannot be rendered ({error}).") from None
        finally:
            document.close()
    if scan is not None:
        words = [(text, (left + word_left * 72 / OCR_DPI, top - word_bottom * 72 / OCR_DPI,
                         left + word_right * 72 / OCR_DPI, top - word_top * 72 / OCR_DPI))
                 for text, (word_left, word_top, word_right, word_bottom) in recognise(scan, OCR_DPI)]
        boxes = find_boxes(RecognisedText(words).occurrences, highlight)
    if boxes:
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        pad = 1.5 * scale
        for box_left, box_bottom, box_right, box_top in boxes:
            draw.rectangle(((box_left - left) * scale - pad, (top - box_top) * scale - pad,
                            (box_right - left) * scale + pad, (top - box_bottom) * scale + pad),
                           fill=FILL, outline=OUTLINE, width=max(1, round(scale)))
        image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    if rotation:
        image = image.rotate(-rotation, expand=True)  # PIL turns counter-clockwise, /Rotate clockwise
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def page_of_quote(path: Path, pages: range, quote: str) -> int | None:
    """The first of `pages` (1-based) of the PDF at `path` on which `quote` stands (searched like a highlight);
    None when the file cannot be read or no page holds it. For the quotes of a chunk that spans a page break. Pages
    without a text layer (scans, read by OCR at ingestion) cannot be searched here: a quote that no searchable page
    holds is placed on the first of them."""
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(path)
        except (pdfium.PdfiumError, OSError):
            return None
        try:
            scanned = None
            for page in pages:
                if not 1 <= page <= len(document):
                    continue
                textpage = document[page - 1].get_textpage()
                if not textpage.count_chars():
                    scanned = scanned or page
                elif find_boxes(text_layer(textpage), quote):
                    return page
            return scanned
        except pdfium.PdfiumError:
            return None
        finally:
            document.close()


def find_boxes(search: Search, quote: str) -> list[Box]:
    """The boxes of `quote`'s words on a page whose text `search` finds (see the module's docstring for how each
    kind of quote is searched)."""
    lines = [line.strip() for line in quote.strip().splitlines() if line.strip()]
    if lines and all(line.startswith("|") for line in lines):
        return [box for line in lines if not TABLE_RULE.match(line) for box in _row_boxes(search, line)]
    text = " ".join(quote.replace("```", " ").split())
    found = search(text)
    words = text.split()
    for count in SENTENCE_PREFIX_WORDS:
        if found or len(words) <= count:
            break
        found = search(" ".join(words[:count]))
    return [box for boxes in found[:1] for box in boxes]  # the first place it stands (a quote is one span)


def _row_boxes(search: Search, row: str) -> list[Box]:
    """A table row's cells on one line of the page: the line of the label (else of the first figure) on which
    most of the row's figures stand (the same label or figure elsewhere on the page is another row's or a
    sentence's)."""
    label, *values = [cell.strip() for cell in row.strip().strip("|").split("|")]
    figures = [search(value) or search(value.replace(" ", "")) for value in values if len(value) >= MIN_CELL_CHARS]
    anchors = search(label) if len(label) >= MIN_CELL_CHARS else []
    labelled = bool(anchors)
    if not labelled:
        anchors = next((places for places in figures if places), [])
    best: list[Box] = []
    for anchor in anchors:
        line = [next((place for place in places if _same_line(place[0], anchor[0])), []) for places in figures]
        boxes = (anchor if labelled else []) + [box for place in line for box in place]
        if len(boxes) > len(best):
            best = boxes
    return best


def _same_line(box: Box, other: Box) -> bool:
    low, high = max(box[1], other[1]), min(box[3], other[3])
    return high - low >= 0.5 * min(box[3] - box[1], other[3] - other[1])


def text_layer(textpage) -> Search:
    """A page's text layer searched with PDFium (case-insensitive, across line breaks)."""
    def occurrences(text: str) -> list[list[Box]]:
        if not text:
            return []
        searcher = textpage.search(text, match_case=False)
        places = []
        while (found := searcher.get_next()) is not None:
            index, count = found
            if rects := _rects(textpage, index, count):  # a match of characters without boxes cannot be shown
                places.append(rects)
        return places

    return occurrences


def _rects(textpage, index: int, count: int) -> list[Box]:
    # FPDFText_CountRects over a range fills the rectangles that FPDFText_GetRect then reads, by their own index.
    return [textpage.get_rect(i) for i in range(textpage.count_rects(index, count))]


class RecognisedText:
    """A scanned page's recognised words, searched like a text layer: case-insensitive, whitespace-insensitive
    (each run of spaces and line breaks is one space); a match is the boxes of the words it touches."""

    def __init__(self, words: list[tuple[str, Box]]):
        self.boxes = [box for _, box in words]
        self.text, self.starts = "", []
        for text, _ in words:
            self.starts.append(len(self.text))
            self.text += " ".join(text.lower().split()) + " "

    def occurrences(self, text: str) -> list[list[Box]]:
        needle = " ".join(text.lower().split())
        places, start = [], self.text.find(needle) if needle else -1
        while start >= 0:
            first = bisect.bisect_right(self.starts, start) - 1
            last = bisect.bisect_left(self.starts, start + len(needle))
            places.append(self.boxes[first:last])
            start = self.text.find(needle, start + 1)
        return places


class RenderedPages:
    """Rendered PNGs by key, least recently used dropped first once they hold more than `max_bytes`."""

    def __init__(self, max_bytes: int = PAGE_CACHE_BYTES):
        self.max_bytes, self.size = max_bytes, 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple, png: bytes) -> None:
        if len(png) > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self.size -= len(self._items.pop(key))
            self._items[key] = png
            self.size += len(png)
            while self.size > self.max_bytes:
                self.size -= len(self._items.popitem(last=False)[1])
