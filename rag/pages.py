"""A PDF page as a PNG with the quoted words highlighted, so that a reader sees evidence where it stands on the page.

    png = render_page(Path("report.pdf"), page=2, highlight="| Net sales | 1,250 | 1,100 | 14% |")

The quote is found in the page's own text layer with PDFium's search (case-insensitive), which matches across the
line breaks and spacing that ingestion normalised: a table row (Markdown, as evidence quotes it) is searched cell by
cell, its figures kept to the line of its label when the label is found; a sentence is searched whole, else by its
first words (a quote that ran across a page break, or whose ligatures or hyphens the text layer spells otherwise).
Words that cannot be found are simply not highlighted: the page is still the page the evidence names.

PDFium is not thread-safe, so every call into it here holds one process-wide lock; the API renders off its event
loop (api/routes/sources.py) and keeps the PNGs in a `RenderedPages` cache bounded in bytes.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
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


class PageNotFoundError(NotFoundError):
    """The document has no page with this number."""

    code = "page_not_found"


class PageUnreadableError(UserError):
    """The file cannot be opened or rendered as a PDF."""

    code = "page_unreadable"


def render_page(path: Path, page: int, highlight: str = "", display_name: str = "") -> bytes:
    """Page `page` (1-based) of the PDF at `path` as PNG bytes, with the words of `highlight` boxed. Errors name the
    file by `display_name` (never its path on the server)."""
    import pypdfium2 as pdfium
    from PIL import Image, ImageDraw

    name = display_name or path.name
    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(path)
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
            boxes = find_boxes(pdf_page.get_textpage(), highlight) if highlight.strip() else []
        except pdfium.PdfiumError as error:
            raise PageUnreadableError(f"Page {page} of '{name}' cannot be rendered ({error}).") from None
        finally:
            document.close()
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
    None when the file cannot be read or no page holds it. For the quotes of a chunk that spans a page break."""
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(path)
        except (pdfium.PdfiumError, OSError):
            return None
        try:
            for page in pages:
                if 1 <= page <= len(document) and find_boxes(document[page - 1].get_textpage(), quote):
                    return page
        except pdfium.PdfiumError:
            return None
        finally:
            document.close()
    return None


def find_boxes(textpage, quote: str) -> list[Box]:
    """The boxes of `quote`'s words on the page (see the module's docstring for how each kind is searched)."""
    lines = [line.strip() for line in quote.strip().splitlines() if line.strip()]
    if lines and all(line.startswith("|") for line in lines):
        return [box for line in lines if not TABLE_RULE.match(line) for box in _row_boxes(textpage, line)]
    text = " ".join(quote.replace("```", " ").split())
    found = _occurrences(textpage, text)
    words = text.split()
    for count in SENTENCE_PREFIX_WORDS:
        if found or len(words) <= count:
            break
        found = _occurrences(textpage, " ".join(words[:count]))
    return [box for boxes in found[:1] for box in boxes]  # the first place it stands (a quote is one span)


def _row_boxes(textpage, row: str) -> list[Box]:
    """A table row's cells on one line of the page: the line of the label (else of the first figure) on which
    most of the row's figures stand (the same label or figure elsewhere on the page is another row's or a
    sentence's)."""
    label, *values = [cell.strip() for cell in row.strip().strip("|").split("|")]
    figures = [_occurrences(textpage, value) or _occurrences(textpage, value.replace(" ", ""))
               for value in values if len(value) >= MIN_CELL_CHARS]
    anchors = _occurrences(textpage, label) if len(label) >= MIN_CELL_CHARS else []
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


def _occurrences(textpage, text: str) -> list[list[Box]]:
    """Every place `text` stands on the page, each as the boxes PDFium gives its characters' runs."""
    if not text:
        return []
    searcher = textpage.search(text, match_case=False)
    places = []
    while (found := searcher.get_next()) is not None:
        index, count = found
        if rects := _rects(textpage, index, count):  # a match of characters without boxes cannot be shown
            places.append(rects)
    return places


def _rects(textpage, index: int, count: int) -> list[Box]:
    # FPDFText_CountRects over a range fills the rectangles that FPDFText_GetRect then reads, by their own index.
    return [textpage.get_rect(i) for i in range(textpage.count_rects(index, count))]


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
