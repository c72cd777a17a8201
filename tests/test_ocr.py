"""OCR of scanned PDF pages and image files (ingest/ocr.py) with the real engine, Debian's tesseract."""

import io
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFont

from ingest.job import IngestJob
from ingest.limits import Limits
from ingest.load import LoadError, load, ocr_options
from ingest.ocr import image_pdf, page_words, without_rules
from ingest.pdf import parse_pdf
from rag.pages import OCR_DPI, RecognisedText, render_page
from rag.retrieve import Retriever
from rag.store import Store
from rag.types import DEFAULT_COLLECTION
from tests.pdfs import make_pdf, report_with_scanned_pages, report_with_table
from tests.test_web_routes import api_base_index, changed_rows, pixels, wait_job, web  # noqa: F401, F811

# scripts/install.sh installs tesseract wherever it runs as root with apt (CI does): there a missing engine fails
# these tests; elsewhere they skip and say why.
pytestmark = pytest.mark.skipif(shutil.which("tesseract") is None
                                and not (os.geteuid() == 0 and shutil.which("apt-get")),
                                reason="tesseract is not installed (scripts/install.sh installs it as root with apt)")

# Text drawn at 12 pt on a page scanned at OCR_DPI (50 px), in the font Pillow ships.
FONT = ImageFont.load_default(size=OCR_DPI * 12 // 72)
PAGE = (int(8.5 * OCR_DPI), 11 * OCR_DPI)  # US Letter


def scanned_page(lines: list[tuple[int, str]]) -> Image.Image:
    """A white page with text lines drawn at (x in pixels, line number): what a scanner makes of a printed page."""
    image = Image.new("L", PAGE, 255)
    draw = ImageDraw.Draw(image)
    for row, (x, text) in enumerate(lines):
        draw.text((x, OCR_DPI + row * 80), text, fill=0, font=FONT)
    return image


LETTER = [(200, "Harbour Authority of Port Quillon"),
          (200, "The lighthouse keeper logged the ketch Marlowquist"),
          (200, "entering the harbour at dawn on the third of May.")]


def _ocr_limits(**overrides) -> Limits:
    from rag.config import Settings

    return Limits.from_settings(Settings(**overrides))


def test_a_scanned_page_is_searchable_by_a_word_only_its_image_holds(tmp_path, settings, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "letter.pdf").write_bytes(image_pdf([scanned_page(LETTER)]))
    shutil.copy(Path(__file__).parent / "data" / "MEDRPT-2024-PAT-3847_medical_report_scan.pdf",
                folder / "medrpt.pdf")
    (folder / "signed.pdf").write_bytes(report_with_scanned_pages())  # pages 2 and 4: grey, nothing to read
    settings = settings.with_overrides(parse_workers=2)  # read in the parse workers, within their memory budget
    report = IngestJob(settings, embedder).run(folder)
    assert not report.failed and report.status_counts["new"] == 3, report.to_dict()
    store = Store.open(settings.index_dir)
    # kept with the document, where `rag documents list` and GET /v1/documents show it
    warnings = {Path(record.source).name: record.warnings
                for record in store.documents(collection=DEFAULT_COLLECTION).values()}
    assert warnings["letter.pdf"] == warnings["medrpt.pdf"] == ()
    [blank] = warnings["signed.pdf"]
    assert "OCR found no text in them" in blank and blank.endswith("page 2, 4")
    retriever = Retriever(store, embedder)
    [hit] = retriever.retrieve("Marlowquist", 1, "bm25", collection=DEFAULT_COLLECTION)
    assert Path(hit.chunk.source).name == "letter.pdf" and hit.chunk.page == 1
    assert "lighthouse keeper logged the ketch Marlowquist" in hit.chunk.text
    # the shared data set's scanned medical report (an image-only PDF) is searchable too
    [hit] = retriever.retrieve("medical report patient", 1, "bm25", collection=DEFAULT_COLLECTION)
    assert Path(hit.chunk.source).name == "medrpt.pdf"


def test_lines_come_in_reading_order_and_a_scanned_tables_rows_keep_their_cells(tmp_path):
    rows = [(200, "Results of Operations"), (200, "Net sales rose in every region this quarter."),
            (200, "Net sales"), (200, "Cost of sales"), (200, "Operating income")]
    image = scanned_page(rows)
    draw = ImageDraw.Draw(image)
    for row, cells in ((2, ("1,250", "1,100", "14%")), (3, ("700", "640", "9%")), (4, ("310", "260", "19%"))):
        for column, cell in enumerate(cells):
            draw.text((900 + column * 250, OCR_DPI + row * 80), cell, fill=0, font=FONT)
    (tmp_path / "scan.pdf").write_bytes(image_pdf([image]))
    document = load(tmp_path / "scan.pdf")
    assert document.warnings == ()
    [table] = [element for element in document.elements if element.category == "Table"]
    assert table.text.endswith("| Net sales | 1,250 | 1,100 | 14% |\n| Cost of sales | 700 | 640 | 9% |\n"
                               "| Operating income | 310 | 260 | 19% |")
    texts = [element.text for element in document.elements]
    assert texts.index("Net sales rose in every region this quarter.") < texts.index(table.text)


def test_blank_scanned_pages_give_a_warning_not_a_failure(tmp_path):
    (tmp_path / "signed.pdf").write_bytes(report_with_scanned_pages())  # pages 2 and 4: grey images, no text
    document = load(tmp_path / "signed.pdf")
    assert {element.page for element in document.elements} == {1, 3}
    [warning] = document.warnings
    assert "OCR found no text in them" in warning and warning.endswith("not indexed: page 2, 4")
    (tmp_path / "blank.pdf").write_bytes(image_pdf([Image.new("L", PAGE, 255)]))
    with pytest.raises(LoadError, match="no text layer on its 1 page.*OCR found no text"):
        load(tmp_path / "blank.pdf")  # nothing at all to index: the file fails, saying why


def test_a_page_past_the_time_limit_is_left_out_with_a_warning(tmp_path):
    typed = [(72, 720, 11, "Quarterly Operations Report")]
    (tmp_path / "report.pdf").write_bytes(make_pdf([typed]))
    scan = image_pdf([scanned_page(LETTER)])
    import pypdfium2 as pdfium  # the typed page first, then the scanned one

    merged = pdfium.PdfDocument(str(tmp_path / "report.pdf"))
    merged.import_pages(pdfium.PdfDocument(scan))
    merged.save(tmp_path / "both.pdf")
    document = load(tmp_path / "both.pdf", limits=_ocr_limits(ocr_page_timeout_s=0.001))
    [warning] = document.warnings
    assert "page time limit of 0.001 s (RAG_OCR_PAGE_TIMEOUT_S)" in warning
    assert warning.endswith("not indexed: page 2")
    assert {element.page for element in document.elements} == {1}


def test_low_confidence_pages_are_ingested_with_a_warning(tmp_path):
    (tmp_path / "letter.pdf").write_bytes(image_pdf([scanned_page(LETTER)]))
    sure = load(tmp_path / "letter.pdf")
    assert sure.warnings == ()
    # The page's confidence, whatever it is on this machine, is below a threshold of 1: warned, and still indexed.
    unsure = load(tmp_path / "letter.pdf", limits=_ocr_limits(ocr_min_confidence=1.0))
    [warning] = unsure.warnings
    assert "read by OCR with a confidence below 1 (RAG_OCR_MIN_CONFIDENCE" in warning and "page 1 (0." in warning
    assert [element.text for element in unsure.elements] == [element.text for element in sure.elements]


def test_png_and_multi_page_tiff_files_are_read_by_ocr(tmp_path):
    scanned_page(LETTER).save(tmp_path / "letter.png")
    second = scanned_page([(200, "Page two lists the cargo: forty barrels of Quillon cider.")])
    scanned_page(LETTER).save(tmp_path / "letter.tiff", save_all=True, append_images=[second])
    png = load(tmp_path / "letter.png")
    assert "Marlowquist" in " ".join(element.text for element in png.elements) and png.warnings == ()
    tiff = load(tmp_path / "letter.tiff")
    assert {element.page for element in tiff.elements} == {1, 2}
    assert any("forty barrels of Quillon cider" in element.text and element.page == 2 for element in tiff.elements)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(LoadError, match="not a readable image"):
        load(tmp_path / "broken.jpg")
    buffer = io.BytesIO()
    scanned_page(LETTER).save(buffer, format="JPEG")
    (tmp_path / "letter.jpg").write_bytes(buffer.getvalue())
    with pytest.raises(LoadError, match=r"an image file is read by OCR: OCR is off \(RAG_OCR=off\)"):
        load(tmp_path / "letter.jpg", limits=_ocr_limits(ocr="off"))


def test_ocr_off_reports_scanned_pages_as_before_and_typed_pages_are_never_ocred(tmp_path):
    (tmp_path / "signed.pdf").write_bytes(report_with_scanned_pages())
    [warning] = load(tmp_path / "signed.pdf", limits=_ocr_limits(ocr="off")).warnings
    assert "OCR is off (RAG_OCR=off)" in warning and warning.endswith("not indexed: page 2, 4")
    (tmp_path / "table.pdf").write_bytes(report_with_table())
    parsed = parse_pdf(tmp_path / "table.pdf", ocr=ocr_options(_ocr_limits()))
    assert parsed.ocr_pages == {} and parsed.scanned_pages == []


def test_rules_are_taken_off_the_image_and_the_words_stay():
    """An underline (a hyperlink in a filing's exhibit index) is painted out; the text above it is untouched."""
    import numpy as np

    image = scanned_page(LETTER)
    underline = OCR_DPI + 80 + 70  # under the second line's text
    ImageDraw.Draw(image).line((200, underline, 1500, underline), fill=0, width=3)
    before, after = np.array(image), np.array(without_rules(image))
    assert (after[underline - 2:underline + 3, 202:1498] == 255).all()  # (a pixel at an end may stay)
    assert (after[:underline - 5] == before[:underline - 5]).all()  # the letters, rows above the rule


def test_recognised_words_are_searched_like_a_text_layer():
    words = RecognisedText([("Net", (0, 0, 1, 1)), ("sales", (1, 0, 2, 1)), ("1,250", (3, 0, 4, 1)),
                            ("net", (0, 5, 1, 6)), ("Sales", (1, 5, 2, 6))])
    assert words.occurrences("net  SALES") == [[(0, 0, 1, 1), (1, 0, 2, 1)], [(0, 5, 1, 6), (1, 5, 2, 6)]]
    assert words.occurrences("sales 1,250") == [[(1, 0, 2, 1), (3, 0, 4, 1)]]
    assert words.occurrences("1,25") == [[(3, 0, 4, 1)]]  # a part of a word marks the word
    assert words.occurrences("gross margin") == [] and words.occurrences("") == []


def test_a_quote_on_a_scanned_page_is_highlighted_where_ocr_read_it():
    scan = image_pdf([scanned_page(LETTER)])
    recognise = partial(page_words, timeout_s=60)
    plain = pixels(render_page(scan, 1, "", "letter.pdf", recognise))
    marked = pixels(render_page(scan, 1, "the ketch Marlowquist", "letter.pdf", recognise))
    top, bottom = changed_rows(plain, marked)
    scale = plain.height / PAGE[1]
    line = OCR_DPI + 80  # the second line's top, in the scan's pixels
    assert (line - 15) * scale <= top and bottom <= (line + 80) * scale, (top, bottom, scale)
    left = ImageChops.difference(plain, marked).getbbox()[0]
    assert left >= (200 + FONT.getlength("The lighthouse keeper logged ") - 20) * scale  # the quote's words only
    assert pixels(render_page(scan, 1, "the ketch Marlowquist", "letter.pdf")) == plain  # no OCR given: no marks


def test_a_quote_of_a_chunk_across_scanned_pages_is_placed_not_dropped(tmp_path):
    from rag.pages import page_of_quote

    scan = tmp_path / "scan.pdf"
    scan.write_bytes(image_pdf([scanned_page(LETTER), scanned_page(LETTER)]))
    assert page_of_quote(scan, range(1, 3), "the ketch Marlowquist") == 1  # no text layer to search: first page
    typed = tmp_path / "typed.pdf"
    typed.write_bytes(report_with_table())
    assert page_of_quote(typed, range(1, 3), "words on no page at all") is None


def test_an_image_files_page_is_shown_with_the_quote_highlighted(web):  # noqa: F811
    buffer = io.BytesIO()
    scanned_page(LETTER).save(buffer, format="PNG")
    job = wait_job(web, web.post("/v1/documents", files=[("files", ("harbour.png", buffer.getvalue()))]).json()["job_id"])
    [done] = job["files"]
    route = f"/v1/documents/{done['doc_id']}/pages"
    plain = web.get(f"{route}/1.png")
    assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
    marked = web.get(f"{route}/1.png", params={"highlight": "entering the harbour at dawn"})
    top, _ = changed_rows(pixels(plain.content), pixels(marked.content))
    assert top >= (OCR_DPI + 2 * 80 - 15) * pixels(plain.content).height / PAGE[1]  # the third line
    assert web.get(f"{route}/2.png").json()["error"]["code"] == "page_not_found"
