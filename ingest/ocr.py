"""OCR for pages without a usable text layer (scans, photos, image files), with Debian's tesseract.

Why tesseract (measured in docs/ocr.md): on four FinanceBench pages rendered at 200 dpi, its character error rate
against the text layer was 0.5% at 2.9 CPU seconds a page, RapidOCR's (PP-OCRv4 ONNX models inside its wheel) 12.3%
at 31 s. It runs as a child process, so a page past its time limit is killed cleanly (an ONNX session inside the
parse worker could not be stopped short of killing the worker), and RapidOCR's wheel would also pull opencv-python
beside the project's opencv-python-headless. scripts/install.sh installs it (`apt-get install tesseract-ocr`, as
root); without it, scanned pages are reported as not indexed, as before.

The interface is small: `recognise(image, timeout_s)` → `OcrPage` (words with boxes in the image's pixels, grouped
into runs the way a text layer's characters are, and a confidence). ingest/pdf_text.py turns the runs into its
lines, so recognised text goes through the same layout recovery as a text layer (reading order, headings, tables with their
cells in order).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rag.config import Settings
from rag.pages import OCR_DPI

if TYPE_CHECKING:
    from PIL.Image import Image


# Words further apart than this many times their height are separate runs (cells of a table row), as a text layer's
# glyphs are split by ingest/pdf_text.py.
RUN_GAP = 0.9
# A text layer is garbage (a font without a usable ToUnicode map, a broken encoder) when more than this share of its
# characters are unprintable, private-use or U+FFFD: then the page is read as an image.
GARBAGE_SHARE = 0.5
TESSERACT = "tesseract"
# Rules (underlines, table borders) are taken off the image before OCR: tesseract's layout analysis drops whole
# lines of text that a rule runs under or through (an 8-K's underlined exhibit index lost 10 of its 18 lines at 200
# dpi, CER 0.216 → 0.003; 24 filing pages at 200 dpi: CER 3.1% → 1.7%, docs/ocr.md). A rule is a run of dark pixels at
# least RULE_INCHES long, longer than any letter's stroke; dark is below INK_LEVEL, so that a table's light grey row
# shading is not a rule (taken for one, it took the row's figures with it).
RULE_INCHES = 0.5
INK_LEVEL = 128


@dataclass(frozen=True, slots=True)
class OcrOptions:
    """How ingestion uses OCR (settings RAG_OCR, RAG_OCR_MIN_CONFIDENCE, RAG_OCR_PAGE_TIMEOUT_S), sent to the parse
    workers with the file's limits."""

    mode: str  # "auto": OCR pages without a usable text layer, and image files; "off": never
    min_confidence: float  # pages read with less are ingested with a warning
    page_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> OcrOptions:
        return cls(settings.ocr, settings.ocr_min_confidence, settings.ocr_page_timeout_s)


@dataclass(frozen=True, slots=True)
class Run:
    """Words of one line without a wide gap between them, box in the image's pixels (top < bottom)."""

    text: str
    left: int
    right: int
    top: int
    bottom: int
    line_height: int  # the height of the whole line, the same for each of its runs (a steadier font size)


@dataclass(frozen=True, slots=True)
class OcrPage:
    runs: list[Run]
    confidence: float | None  # character-weighted mean of the words' confidences, 0-1; None: no word recognised
    failure: str = ""  # why nothing was recognised (time limit, engine error); empty when it ran


def unavailable(options: OcrOptions) -> str:
    """Why pages cannot be read by OCR ("" when they can), in words for a warning."""
    if options.mode == "off":
        return "OCR is off (RAG_OCR=off)"
    if shutil.which(TESSERACT) is None:
        return "OCR is not available: tesseract is not installed (scripts/install.sh installs it as root)"
    return ""


def garbage(text: str) -> bool:
    """A text layer whose characters are mostly unreadable (see GARBAGE_SHARE)."""
    letters = [char for char in text if not char.isspace()]
    bad = sum(1 for char in letters if char == "\ufffd" or unicodedata.category(char) in {"Cc", "Co", "Cn"})
    return bool(letters) and bad > GARBAGE_SHARE * len(letters)


def without_rules(image: Image, dpi: float = OCR_DPI) -> Image:
    """`image` in greyscale with its horizontal rules painted white (see RULE_INCHES)."""
    import cv2
    import numpy as np
    from PIL import Image as PilImage

    grey = np.array(image.convert("L"))
    _, ink = cv2.threshold(grey, INK_LEVEL, 255, cv2.THRESH_BINARY_INV)
    length = max(1, round(RULE_INCHES * dpi))
    rules = cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (length, 1)))
    grey[rules > 0] = 255
    return PilImage.fromarray(grey)


def recognise(image: Image, timeout_s: float, dpi: float = OCR_DPI) -> OcrPage:
    """The words on an image rendered at `dpi`, in runs, with the page's confidence; past `timeout_s`, no runs and
    the reason."""
    tsv = _tesseract(image, dpi, timeout_s)
    return _page(tsv) if isinstance(tsv, str) else tsv


def _tesseract(image: Image, dpi: float, timeout_s: float) -> str | OcrPage:
    """tesseract's TSV for the image without its rules, or an empty page saying why there is none."""
    buffer = io.BytesIO()
    without_rules(image, dpi).save(buffer, format="PPM")  # PGM: no compression to spend time on either side
    # One thread: parallelism comes from the parse workers; tesseract's OpenMP threads only contend with them.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    try:
        done = subprocess.run([TESSERACT, "stdin", "stdout", "--psm", "3", "--dpi", str(round(dpi)), "tsv"],
                              input=buffer.getvalue(), capture_output=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return OcrPage([], None, f"OCR stopped at the page time limit of {timeout_s:g} s (RAG_OCR_PAGE_TIMEOUT_S)")
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return OcrPage([], None, f"OCR failed: {message[0][:200]}")
    return done.stdout.decode("utf-8", errors="replace")


def page_words(image: Image, dpi: float, timeout_s: float) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The words on a page image, each with its box in the image's pixels (left, top, right, bottom), as
    `recognise` reads them: what a highlight on a scanned page is drawn from (rag.pages' `Recogniser`). Nothing
    when OCR fails or runs out of time: the page is then shown without highlights."""
    tsv = _tesseract(image, dpi, timeout_s)
    if not isinstance(tsv, str):
        return []
    return [(word["text"].strip(), (int(word["left"]), int(word["top"]), _right(word),
                                    int(word["top"]) + int(word["height"])))
            for words in _lines(tsv)[0].values() for word in words]


def _lines(tsv: str) -> tuple[dict[tuple[str, str, str], list[dict]], dict[tuple[str, str, str], int]]:
    """tesseract's TSV (one row per page, block, paragraph, line and word) → each line's words and heights."""
    lines: dict[tuple[str, str, str], list[dict]] = {}
    heights: dict[tuple[str, str, str], int] = {}
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        key = (row["block_num"], row["par_num"], row["line_num"])
        if row["level"] == "4":
            heights[key] = int(row["height"])
        elif row["level"] == "5" and row["text"] and row["text"].strip() and float(row["conf"]) >= 0:
            lines.setdefault(key, []).append(row)
    return lines, heights


def _page(tsv: str) -> OcrPage:
    """tesseract's TSV → runs and confidence."""
    lines, heights = _lines(tsv)
    runs, weighted, chars = [], 0.0, 0
    for key, words in lines.items():
        height = heights.get(key) or max(int(word["height"]) for word in words)
        run: list[dict] = []
        for word in words:
            if run and int(word["left"]) - _right(run[-1]) > RUN_GAP * _taller(word, run[-1]):
                runs.append(_run(run, height))
                run = []
            run.append(word)
            weighted += float(word["conf"]) * len(word["text"])
            chars += len(word["text"])
        runs.append(_run(run, height))
    return OcrPage(runs, weighted / chars / 100 if chars else None)


def _right(word: dict) -> int:
    return int(word["left"]) + int(word["width"])


def _taller(word: dict, other: dict) -> int:
    return max(int(word["height"]), int(other["height"]))


def _run(words: list[dict], line_height: int) -> Run:
    return Run(" ".join(word["text"].strip() for word in words), int(words[0]["left"]), _right(words[-1]),
               min(int(word["top"]) for word in words),
               max(int(word["top"]) + int(word["height"]) for word in words), line_height)


def image_pdf(images: list[Image], dpi: float = OCR_DPI) -> bytes:
    """A PDF with one page per image, each page the image alone at `dpi` (no text layer): how an image file is read
    (ingest/load.py), and how tests and bench/ocr.py make scans."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    try:
        for image in images:
            add_image_page(document, image, dpi)
        out = io.BytesIO()
        document.save(out)
        return out.getvalue()
    finally:
        document.close()


def add_image_page(document, image: Image, dpi: float, index: int | None = None) -> None:
    """A page that is `image` alone at `dpi`, inserted into a pypdfium2 document at `index` (None: at the end)."""
    import pypdfium2 as pdfium

    width, height = image.width * 72 / dpi, image.height * 72 / dpi
    page = document.new_page(width, height, index)
    picture = pdfium.PdfImage.new(document)
    bitmap = pdfium.PdfBitmap.from_pil(image if image.mode in {"L", "RGB", "RGBA"}
                                      else image.convert("L" if image.mode == "1" else "RGB"))  # a fax TIFF is 1-bit
    try:
        picture.set_bitmap(bitmap)
        picture.set_matrix(pdfium.PdfMatrix().scale(width, height))
        page.insert_obj(picture)
        page.gen_content()
    finally:
        bitmap.close()
        page.close()
