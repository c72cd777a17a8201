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

if TYPE_CHECKING:
    from PIL.Image import Image


# Pages are rendered at this resolution for OCR: tesseract reads 8-10 pt print best around 200-300 dpi, and time
# grows with pixels; 200 dpi gave a CER of 0-2% on filings (docs/ocr.md).
OCR_DPI = 200
# Words further apart than this many times their height are separate runs (cells of a table row), as a text layer's
# glyphs are split by ingest/pdf_text.py.
RUN_GAP = 0.9
# A text layer is garbage (a font without a usable ToUnicode map, a broken encoder) when more than this share of its
# characters are unprintable, private-use or U+FFFD: then the page is read as an image.
GARBAGE_SHARE = 0.5
TESSERACT = "tesseract"


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


def recognise(image: Image, timeout_s: float) -> OcrPage:
    """The words on an image, in runs, with the page's confidence; past `timeout_s`, no runs and the reason."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    # One thread: parallelism comes from the parse workers; tesseract's OpenMP threads only contend with them.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    try:
        done = subprocess.run([TESSERACT, "stdin", "stdout", "--psm", "3", "--dpi", str(OCR_DPI), "tsv"],
                              input=buffer.getvalue(), capture_output=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return OcrPage([], None, f"OCR stopped at the page time limit of {timeout_s:g} s (RAG_OCR_PAGE_TIMEOUT_S)")
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return OcrPage([], None, f"OCR failed: {message[0][:200]}")
    return _page(done.stdout.decode("utf-8", errors="replace"))


def _page(tsv: str) -> OcrPage:
    """tesseract's TSV (one row per page, block, paragraph, line and word) → runs and confidence."""
    lines: dict[tuple[str, str, str], list[dict]] = {}
    heights: dict[tuple[str, str, str], int] = {}
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        key = (row["block_num"], row["par_num"], row["line_num"])
        if row["level"] == "4":
            heights[key] = int(row["height"])
        elif row["level"] == "5" and row["text"] and row["text"].strip() and float(row["conf"]) >= 0:
            lines.setdefault(key, []).append(row)
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
