"""The routes behind the web app, without a browser: the page and its headers, passages, original files, PDF page
images with the quoted words highlighted, and evaluation reports (auth, content types that cannot run script, path
traversal). Browser tests: test_web.py.
"""

from __future__ import annotations

import io
import os
import shutil

import pytest

from tests.pdfs import report_with_table
from tests.test_api import AUTH, KEY, api_base_index, wait_job, wait_ready  # noqa: F401  (fixture re-exported)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


@pytest.fixture(scope="module")
def web(api_base_index, embedder, generator, tmp_path_factory):  # noqa: F811
    """A TestClient over a copy of the index, with a results folder of made-up reports (and traps)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.config import ApiSettings
    from rag.config import Settings
    from rag.pipeline import Pipeline

    root = tmp_path_factory.mktemp("web-routes")
    shutil.copytree(api_base_index, root / "index", symlinks=True)
    results = root / "results"
    (results / "run-1").mkdir(parents=True)
    (results / "run-1" / "report.md").write_text("# Evaluation: qa.jsonl\n\n| path | F1 |\n|---|---|\n| rag | 0.3 |\n")
    (results / "run-1" / "latency.png").write_bytes(PNG)
    (results / "run-1" / "cache.jsonl").write_text("{}\n")  # not a served type
    (root / "secret.md").write_text("outside the results folder\n")
    os.symlink(root / "secret.md", results / "run-1" / "leak.md")  # a link out of the folder
    (results / "no-report").mkdir()  # a folder without report.md is not an evaluation
    (results / ".hidden").mkdir()
    (results / ".hidden" / "report.md").write_text("# hidden\n")
    settings = Settings(index_dir=root / "index", parse_workers=1, results_dir=results)
    app = create_app(settings, Pipeline(settings, generator=generator),
                     api_settings=ApiSettings(api_keys=KEY, index_poll_s=0), ingest_embedder=embedder)
    with TestClient(app, headers=AUTH) as client:
        wait_ready(client)
        yield client


def test_page_and_static_files_carry_security_headers(web):
    page = web.get("/", headers={"Authorization": ""})  # the page itself needs no key: it holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert '<script type="module" src="/web/main.js">' in page.text and "<script>" not in page.text
    script = web.get("/web/main.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert web.get("/web/main.js", headers={"If-None-Match": script.headers["etag"]}).status_code == 304
    for probe in ("/web/nope.js", "/web/..%2F__init__.py", "/web/%2E%2E%2Fapp.py"):
        assert web.get(probe).status_code == 404, probe


def test_the_page_reads_the_request_limits_from_the_server(web):
    from api.config import MAX_ANSWER_CHARS, MAX_HISTORY_TURNS, MAX_QUESTION_CHARS
    from rag.pages import MAX_HIGHLIGHT_CHARS

    limits = web.get("/web/config.json", headers={"Authorization": ""})  # no key: limits are no secret
    assert limits.status_code == 200 and limits.json() == {"max_question_chars": MAX_QUESTION_CHARS,
                                                           "max_answer_chars": MAX_ANSWER_CHARS,
                                                           "max_history_turns": MAX_HISTORY_TURNS,
                                                           "max_highlight_chars": MAX_HIGHLIGHT_CHARS}


def test_every_web_route_needs_the_key(web):
    no_key = {"Authorization": ""}
    for route in ("/v1/evals", "/v1/evals/run-1/report.md", "/v1/chunks/1", "/v1/documents/abc/file",
                  "/v1/documents/abc/pages/1.png"):
        assert web.get(route, headers=no_key).status_code == 401, route
        assert web.get(route, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"


def test_a_passage_by_chunk_id(web):
    hit = web.post("/v1/search", json={"query": "timeout", "k": 1}).json()["results"][0]
    passage = web.get(f"/v1/chunks/{hit['chunk_id']}").json()
    assert passage["text"] == hit["text"] and passage["doc_id"] == hit["doc_id"] and passage["source"] == hit["source"]
    missing = web.get("/v1/chunks/999999999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "chunk_not_found"
    assert web.get("/v1/chunks/-1").status_code == 422


def test_original_files_are_served_so_they_cannot_run_script(web):
    files = {"page.html": b"<html><body><p>Wombats dig burrows.</p><script>alert(1)</script></body></html>",
             "notes.md": b"# Notes\n\nPlain.\n"}
    accepted = web.post("/v1/documents", files=[("files", (name, data)) for name, data in files.items()]).json()
    job = wait_job(web, accepted["job_id"])
    assert [f["status"] for f in job["files"]] == ["new", "new"], job
    ids = {f["filename"]: f["doc_id"] for f in job["files"]}

    html = web.get(f"/v1/documents/{ids['page.html']}/file")
    assert html.status_code == 200 and html.content == files["page.html"]
    assert html.headers["content-type"].startswith("text/plain")  # shown as its source, never rendered
    assert html.headers["content-security-policy"].startswith("sandbox")
    assert html.headers["x-content-type-options"] == "nosniff"
    markdown = web.get(f"/v1/documents/{ids['notes.md']}/file")
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.headers["content-disposition"].startswith("inline")

    # The file on disk changed since it was ingested: the pages an answer cited may no longer be there. It is found
    # from the settings (`source` is only a display name: as a path it would be relative to the checkout).
    source = next(d["source"] for d in web.get("/v1/documents").json()["documents"] if d["doc_id"] == ids["notes.md"])
    stored = web.app.state.settings.upload_root / "default" / source
    assert stored.is_file(), stored
    stored.write_bytes(b"# Notes\n\nRewritten.\n")
    changed = web.get(f"/v1/documents/{ids['notes.md']}/file")
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "file_changed"
    stored.unlink()
    assert web.get(f"/v1/documents/{ids['notes.md']}/file").json()["error"]["code"] == "file_not_found"
    assert web.get("/v1/documents/0123456789abcdef/file").status_code == 404


ROW = "| Net sales | 1,250 | 1,100 | 14% |"  # tests/pdfs.py report_with_table, page 2, as evidence quotes it


def pixels(png: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def changed_rows(plain, marked) -> tuple[int, int]:
    """The first and last pixel rows where the highlighted page differs from the plain one."""
    from PIL import ImageChops

    box = ImageChops.difference(plain, marked).getbbox()
    assert box is not None, "nothing highlighted"
    return box[1], box[3]


def test_a_table_row_is_found_on_its_own_line():
    """The row's label also starts a sentence above the table: its figures say which "Net sales" is the row's."""
    import pypdfium2 as pdfium

    from rag.pages import find_boxes, text_layer

    document = pdfium.PdfDocument(report_with_table())
    textpage = document[1].get_textpage()
    boxes = find_boxes(text_layer(textpage), ROW)
    assert len(boxes) == 4  # label and three figures
    assert max(box[1] for box in boxes) < min(box[3] for box in boxes)  # one line: every box overlaps the others
    sentence = find_boxes(text_layer(textpage), "Net sales rose in every region, as the table below shows.")
    assert sentence and min(box[1] for box in sentence) > max(box[3] for box in boxes)  # the line above the table
    cut = find_boxes(text_layer(textpage), "Net sales rose in every region, as the table below shows and then some words "
                               "that the page never says.")
    assert cut and cut[0][:2] == sentence[0][:2]  # not found whole: its first words
    assert find_boxes(text_layer(textpage), "Words that are on no page at all") == []
    document.close()


def test_rendered_pages_are_bounded_in_bytes():
    from rag.pages import RenderedPages

    cache = RenderedPages(max_bytes=10)
    cache.put(("a",), b"1234")
    cache.put(("b",), b"5678")
    assert cache.get(("a",)) == b"1234"  # now the most recent: "b" goes first
    cache.put(("c",), b"9012")
    assert cache.get(("b",)) is None and cache.get(("a",)) == b"1234" and cache.size == 8
    cache.put(("d",), b"x" * 11)  # larger than the whole budget: not kept
    assert cache.get(("d",)) is None and cache.size == 8


def test_a_pdf_page_as_an_image_with_the_quoted_words_highlighted(web):
    from rag.pages import MAX_HIGHLIGHT_CHARS, MAX_PAGE_WIDTH

    files = [("files", ("northwind.pdf", report_with_table())), ("files", ("plain.md", b"# Plain\n\nText.\n"))]
    job = wait_job(web, web.post("/v1/documents", files=files).json()["job_id"])
    ids = {f["filename"]: f["doc_id"] for f in job["files"]}
    route = f"/v1/documents/{ids['northwind.pdf']}/pages"

    plain = web.get(f"{route}/2.png")
    assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
    assert plain.headers["x-content-type-options"] == "nosniff"
    marked = web.get(f"{route}/2.png", params={"highlight": ROW})
    plain_image, marked_image = pixels(plain.content), pixels(marked.content)
    assert plain_image.size == marked_image.size and plain_image.width <= MAX_PAGE_WIDTH
    top, bottom = changed_rows(plain_image, marked_image)
    # Page 2 is 792 units high, its "Net sales" row at y=650 (10-point text): the marks lie on that line only.
    scale = plain_image.height / 792
    assert (792 - 662) * scale <= top and bottom <= (792 - 645) * scale, (top, bottom, scale)
    assert web.get(f"{route}/2.png", params={"highlight": ROW}).content == marked.content  # from the cache

    sentence = pixels(web.get(f"{route}/2.png", params={"highlight": "net sales rose in every region"}).content)
    assert changed_rows(plain_image, sentence)[1] < top  # the sentence above the table, case aside

    for page, status, code in ((3, 404, "page_not_found"), (0, 422, "validation_error")):
        refused = web.get(f"{route}/{page}.png")
        assert refused.status_code == status and refused.json()["error"]["code"] == code, refused.text
    assert "no page 3" in web.get(f"{route}/3.png").json()["error"]["message"]
    too_long = web.get(f"{route}/1.png", params={"highlight": "x" * (MAX_HIGHLIGHT_CHARS + 1)})
    assert too_long.status_code == 422
    not_pdf = web.get(f"/v1/documents/{ids['plain.md']}/pages/1.png")
    assert not_pdf.status_code == 404 and not_pdf.json()["error"]["code"] == "not_a_pdf"
    assert web.get("/v1/documents/0123456789abcdef/pages/1.png").json()["error"]["code"] == "document_not_found"

    stored = web.app.state.settings.upload_root / "default" / "northwind.pdf"
    stored.write_bytes(b"%PDF-1.4 not what was ingested")
    changed = web.get(f"{route}/2.png")
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "file_changed"
    for response in (changed, not_pdf, too_long):
        assert str(stored.parent) not in response.text  # a name, never a path on the server


def test_evaluation_reports_are_listed_and_served_read_only(web):
    listing = web.get("/v1/evals").json()["evals"]
    assert [e["name"] for e in listing] == ["run-1"]
    assert listing[0]["title"] == "Evaluation: qa.jsonl" and listing[0]["files"] == ["latency.png", "report.md"]
    report = web.get("/v1/evals/run-1/report.md")
    assert report.headers["content-type"].startswith("text/markdown") and report.text.startswith("# Evaluation")
    assert report.headers["content-security-policy"].startswith("sandbox")
    plot = web.get("/v1/evals/run-1/latency.png")
    assert plot.headers["content-type"] == "image/png" and plot.content == PNG
    for probe in ("/v1/evals/run-1/leak.md", "/v1/evals/run-1/cache.jsonl", "/v1/evals/no-report/report.md",
                  "/v1/evals/.hidden/report.md", "/v1/evals/run-1/..%2F..%2Fsecret.md", "/v1/evals/..%2Fsecret.md/x",
                  "/v1/evals/run-1/%2E%2E%2F%2E%2E%2Fsecret.md"):
        response = web.get(probe)
        assert response.status_code == 404 and "outside" not in response.text, probe
    assert web.post("/v1/evals/run-1/report.md").status_code == 405
