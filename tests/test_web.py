"""The web app in a real headless browser: Debian's chromium driven by Selenium through chromedriver, against a real
uvicorn server (in a thread, sharing the session's models) over a small index of the shipped corpus.

One server and one browser for the module; the tests run in file order and build on each other's state (the key
entered first, the documents uploaded before one is deleted). Screenshots of each screen go to a temporary folder,
or to RAG_WEB_SCREENSHOTS: scripts/screenshots.sh runs these tests to refresh docs/screenshots/ (the README's).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePath

import httpx
import pytest

from tests.conftest import CORPUS, ROOT, free_port, serving
from tests.pdfs import report_with_scanned_pages, report_with_table
from tests.test_api import KEY, api_base_index  # noqa: F401  (session fixture re-exported)

CHROMIUM = Path(os.environ.get("RAG_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("RAG_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1000, 700)
WAIT_S = 120  # a generation of a few tokens on 2 busy cores, with a model that may still be warming up

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason=f"no browser: install Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})"),
]
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def web_app(index: Path, embedder, generator):
    """The service over `index` with the session's models, the repository's evaluation reports and one key."""
    from api.app import create_app
    from api.config import ApiSettings
    from rag.config import Settings
    from rag.pipeline import Pipeline

    settings = Settings(index_dir=index, parse_workers=1, results_dir=ROOT / "results")
    return create_app(settings, Pipeline(settings, generator=generator),
                      api_settings=ApiSettings(api_keys=KEY, index_poll_s=0), ingest_embedder=embedder)


@pytest.fixture(scope="module")
def server(api_base_index, embedder, generator, tmp_path_factory):  # noqa: F811
    index = tmp_path_factory.mktemp("web") / "index"
    shutil.copytree(api_base_index, index, symlinks=True)
    with serving(web_app(index, embedder, generator), free_port()) as base:
        yield base


@pytest.fixture(scope="module")
def browser(server):
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    viewport(driver, *WINDOW)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where screenshots go: never into the checkout unless asked (scripts/screenshots.sh)."""
    chosen = os.environ.get("RAG_WEB_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def screenshot(browser, screenshots) -> Callable[[str], None]:
    """Saves the page as shown as a small PNG, `<name>.png`, reduced to 256 colours."""
    from PIL import Image

    def take(name: str) -> None:
        screenshots.mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(screenshots / f"{name}.png", optimize=True)

    return take


# ------------------------------------------------------------------------------------------------- helpers
def wait(driver, condition, timeout: float = WAIT_S, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's viewport exactly (a window size would include the browser's own frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def find(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def visible(driver, selector: str):
    return wait(driver, lambda d: (found := d.find_elements(By.CSS_SELECTOR, selector)) and found[0].is_displayed()
                and found[0], 20, f"{selector} not visible")


def tab(driver, name: str) -> None:
    find(driver, f"#tab-{name}").click()
    visible(driver, f"#panel-{name}")


def log_in(driver, base: str) -> None:
    driver.get(base)
    visible(driver, "#login-key").send_keys(KEY + Keys.ENTER)
    wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"), 20)


def max_new_tokens(driver, tokens: int) -> None:
    """Ask › Settings › Max new tokens (a reload closes the settings and resets them)."""
    if find(driver, "#settings").get_attribute("open") is None:
        find(driver, "#settings summary").click()
    field = find(driver, "#opt-max_new_tokens")
    field.clear()
    field.send_keys(str(tokens))


# --------------------------------------------------------------------------------------------------- tests
def test_wrong_key_is_refused(server, browser, screenshot):
    browser.get(server)
    key = visible(browser, "#login-key")
    screenshot("login")
    key.send_keys("not-the-key" + Keys.ENTER)
    error = wait(browser, lambda d: find(d, "#login-error").text, 20)
    assert "not valid" in error
    assert browser.execute_script("return sessionStorage.length") == 0  # a refused key is not kept
    assert find(browser, "#panel-ask").is_displayed() is False
    visible(browser, "#login-key").send_keys(KEY + Keys.ENTER)
    visible(browser, "#question")
    storage = browser.execute_script("return [sessionStorage.getItem('rag-api-key'), localStorage.length]")
    assert storage == [KEY, 0] and KEY not in browser.current_url


def test_first_load_is_small_and_fast(server, browser):
    """Printed, not asserted as a hard timing: transfer size and time to usable from navigation start."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    browser.get(server)
    wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"), 20)
    usable_ms, transferred, resources = browser.execute_script("""
        const navigation = performance.getEntriesByType('navigation')[0];
        const resources = performance.getEntriesByType('resource');
        const bytes = [navigation, ...resources].reduce((sum, e) => sum + (e.transferSize || e.encodedBodySize), 0);
        return [performance.getEntriesByName('app-usable')[0].startTime, bytes, resources.length + 1];""")
    browser.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
    print(f"\nfirst load: {transferred / 1024:.1f} KB in {resources} requests, usable after {usable_ms:.0f} ms "
          "(navigation start to the app-usable mark)")
    assert transferred < 300 * 1024


def test_ask_streams_an_answer_with_a_citation(server, browser, screenshot):
    tab(browser, "ask")
    find(browser, "#settings summary").click()
    max_tokens = find(browser, "#opt-max_new_tokens")
    max_tokens.clear()
    max_tokens.send_keys("100000")
    find(browser, "#question").send_keys("How do I set a timeout on a client?" + Keys.ENTER)
    error = wait(browser, lambda d: find(d, "#settings-error").text, message="no validation message")
    assert error.startswith("Max new tokens must be at most 32,768.")  # the API's 422 in words, by the setting
    assert find(browser, "#opt-max_new_tokens").get_attribute("aria-invalid") == "true"
    assert find(browser, ".turn[data-state=error] .error").text

    find(browser, "#new-thread").click()
    max_tokens.clear()
    max_tokens.send_keys("24")
    find(browser, "#question").clear()
    find(browser, "#question").send_keys("What is the default timeout in HTTPX?")
    find(browser, "#ask-button").click()
    turn = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn[data-state=done]"), message="no answer")[0]
    assert int(turn.get_attribute("data-token-events")) >= 1  # tokens arrived as a stream before the answer
    assert turn.find_element(By.CSS_SELECTOR, ".answer-text").text.strip()
    screenshot("ask")
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": server,
                            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    turn.find_element(By.CSS_SELECTOR, "button.copy").click()
    wait(browser, lambda d: turn.find_element(By.CSS_SELECTOR, "button.copy").text == "Copied", 10)
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0](String(e)))")
    assert copied.startswith("**Q:** What is the default timeout in HTTPX?") and "\n[1]: " in copied, copied
    citations = turn.find_elements(By.CSS_SELECTOR, ".answer-text button.cite")
    assert citations, "the answer cites no source"
    citations[0].click()
    dialog = visible(browser, "#passage")
    wait(browser, lambda d: find(d, "#passage-text").get_attribute("aria-busy") is None, 20)
    assert find(browser, "#passage-title").text.endswith(".md")
    passage = find(browser, "#passage-text").text
    assert len(passage) > 50 and "timeout" in passage.lower()
    assert dialog.find_elements(By.CSS_SELECTOR, "#passage-text mark"), "nothing cited is highlighted"
    screenshot("citation")
    main_window = browser.current_window_handle
    find(browser, "#passage-open").click()
    link = visible(browser, "#passage-link")
    assert link.get_attribute("href").startswith("blob:")
    wait(browser, lambda d: len(d.window_handles) == 2, 20, "the original did not open")
    browser.switch_to.window(next(h for h in browser.window_handles if h != main_window))
    try:  # the Markdown original, as plain text (never rendered as a page of this origin)
        assert browser.current_url.startswith("blob:")
        assert "timeout" in browser.find_element(By.TAG_NAME, "body").text.lower()
        assert not browser.find_elements(By.CSS_SELECTOR, "h1, a")
    finally:
        browser.close()
        browser.switch_to.window(main_window)
    find(browser, "#passage-close").click()

    # A follow-up stays in the same thread.
    find(browser, "#question").send_keys("And how do I disable timeouts?" + Keys.ENTER)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn[data-state=done]")) == 2)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#thread .question")) == 2


def thread_text(browser) -> list[tuple[str, str]]:
    turns = browser.find_elements(By.CSS_SELECTOR, "#thread .turn")
    return [(turn.find_element(By.CSS_SELECTOR, ".question").text,
             turn.find_element(By.CSS_SELECTOR, ".answer-text").text) for turn in turns]


def test_the_conversation_survives_a_reload_until_the_key_is_forgotten(server, browser):
    before = thread_text(browser)
    assert len(before) == 2  # the question and its follow-up, above
    browser.refresh()
    wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"), 20)
    assert thread_text(browser) == before
    assert browser.find_elements(By.CSS_SELECTOR, "#thread .answer-text button.cite")  # its citations still open
    find(browser, "#forget-key").click()
    visible(browser, "#login-key").send_keys(KEY + Keys.ENTER)
    visible(browser, "#question")
    assert not browser.find_elements(By.CSS_SELECTOR, "#thread .turn")
    assert browser.execute_script("return Object.keys(sessionStorage)") == ["rag-api-key"]


def test_question_length_is_shown_and_checked_before_sending(server, browser):
    limit = httpx.get(f"{server}/web/config.json").json()["max_question_chars"]  # api/config.py, not the script's
    tab(browser, "ask")
    question = find(browser, "#question")
    question.clear()
    question.send_keys("How long?")
    assert find(browser, "#question-count").text == f"9 / {limit:,} characters"
    browser.execute_script("arguments[0].value = 'x'.repeat(20000);"
                           "arguments[0].dispatchEvent(new Event('input'))", question)
    assert find(browser, "#question-count").text == f"20,000 / {limit:,} characters"
    assert "error" in find(browser, "#question-count").get_attribute("class")
    turns = len(browser.find_elements(By.CSS_SELECTOR, "#thread .turn"))
    find(browser, "#ask-button").click()
    message = find(browser, "#question-error").text
    assert message == f"The question is too long (20,000 characters; the limit is {limit:,})."
    question.clear()
    find(browser, "#ask-button").click()
    assert find(browser, "#question-error").text == "Type a question first."
    assert len(browser.find_elements(By.CSS_SELECTOR, "#thread .turn")) == turns  # nothing was sent


def stub_next_answer(browser, answer: dict) -> None:
    """The page's next POST /v1/ask gets `answer` as its one SSE event, from a stub in the page (once)."""
    browser.execute_script("""
        const body = `event: answer\ndata: ${arguments[0]}\n\n`;
        const real = window.fetch;
        window.fetch = (url, init) => {
          if (url !== "/v1/ask") return real(url, init);
          window.fetch = real;
          return Promise.resolve(new Response(body, { headers: { "Content-Type": "text/event-stream" } }));
        };""", json.dumps(answer))


def made_up_answer(**fields) -> dict:
    source = {"number": 1, "chunk_id": None, "source": "guide.md", "page": None, "heading": "Timeouts",
              "snippet": "The default timeout is five seconds."}
    return {"answer": "", "path": "rag", "citations": [], "sources": [source], "usage": {}, "timings": {},
            "raw_text": "", "finish_reason": "stop", "answerable": True, "confidence": 0.9, "see_also": [],
            "searched": None, **fields}


def test_an_answer_shows_only_what_the_api_returned(server, browser):
    tab(browser, "ask")
    find(browser, "#new-thread").click()
    injected = "<img src=x onerror=\"document.title='pwned'\">"
    stub_next_answer(browser, made_up_answer(answer=f"Five seconds [1]. {injected}", finish_reason="length",
                                             searched="What is the default timeout of an HTTPX client?"))
    find(browser, "#question").send_keys("And its default?" + Keys.ENTER)
    turn = wait(browser, lambda d: (done := d.find_elements(By.CSS_SELECTOR, ".turn[data-state=done]")) and done[-1])
    text = turn.find_element(By.CSS_SELECTOR, ".answer-text")
    assert text.text == f"Five seconds [1]. {injected}"  # as text: no markup, and [1] is not a link
    assert not text.find_elements(By.CSS_SELECTOR, "button, img") and browser.title == "rag-service"
    assert turn.find_element(By.CSS_SELECTOR, ".truncated").text.startswith("Truncated:")
    assert "What is the default timeout of an HTTPX client?" in turn.find_element(By.CSS_SELECTOR, ".searched").text

    stub_next_answer(browser, made_up_answer(answer="The documents don't answer this question.", answerable=False,
                                             sources=[], see_also=made_up_answer()["sources"], confidence=0.1))
    find(browser, "#question").send_keys("Who won the 2016 Super Bowl?" + Keys.ENTER)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn[data-state=done]")) == 2)
    turn = browser.find_elements(By.CSS_SELECTOR, ".turn")[-1]
    assert turn.find_element(By.CSS_SELECTOR, ".answer-text.idk").text.startswith("The documents don't answer")
    assert turn.find_element(By.CSS_SELECTOR, ".sources summary").text == "See also (1)"
    assert not turn.find_elements(By.CSS_SELECTOR, ".truncated, .searched, button.cite")


def test_the_status_says_when_the_server_is_down_and_when_it_is_back(api_base_index, embedder, generator, server,
                                                                      browser, tmp_path):
    shutil.copytree(api_base_index, tmp_path / "index", symlinks=True)
    port = free_port()
    status = "#service-status"
    try:
        with serving(web_app(tmp_path / "index", embedder, generator), port) as base:
            log_in(browser, base)
            wait(browser, lambda d: find(d, status).get_attribute("data-state") == "ready", 20, "never ready")
        wait(browser, lambda d: find(d, status).get_attribute("data-state") == "down", 20, "still 'Ready' when down")
        assert find(browser, status).text.startswith("Server down")
        with serving(web_app(tmp_path / "index", embedder, generator), port):
            wait(browser, lambda d: find(d, status).text == "Ready", 20, "the status did not recover")
    finally:
        browser.get(server)  # back to the module's server (its key is still in that origin's sessionStorage)
        wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"), 20)


def test_compare_two_paths(server, browser, screenshot):
    tab(browser, "ask")
    max_new_tokens(browser, 24)
    find(browser, "#tab-ask").send_keys(Keys.ARROW_RIGHT)  # tabs follow the keyboard (WAI-ARIA tabs pattern)
    visible(browser, "#panel-compare")
    assert browser.switch_to.active_element.get_attribute("id") == "tab-compare"
    paths = {box.get_attribute("value"): box for box in browser.find_elements(By.CSS_SELECTOR, "#compare-paths input")}
    assert set(paths) == {"prompt", "rag"}  # no adapter configured: no fine-tuned paths offered
    find(browser, "#compare-question").send_keys("What is HTTPX?")
    find(browser, "#compare-button").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".column[data-state=done]")) == 2,
         message="compare did not finish")
    columns = browser.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.get_attribute("data-path") for c in columns] == ["prompt", "rag"]
    for column in columns:
        usage = column.find_element(By.CSS_SELECTOR, ".usage").text
        assert "prompt tokens" in usage and "generated" in usage and "total" in usage and " ms" in usage
    screenshot("compare")


def test_upload_markdown_and_pdf_then_delete(server, browser, tmp_path, screenshot):
    tab(browser, "documents")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#documents tbody tr")) == 3, 20)
    note = tmp_path / "wombat-notes.md"
    note.write_text("# Wombat retries\n\nThe wombat-backoff setting doubles the wait between retries.\n")
    pdf = tmp_path / "ntsb-report.pdf"
    shutil.copy(CORPUS / "ntsb" / "20071229X02007.pdf", pdf)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    signed = tmp_path / "signed.pdf"
    signed.write_bytes(report_with_scanned_pages())
    find(browser, "#file-input").send_keys(f"{note}\n{pdf}\n{empty}\n{signed}")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#upload-results > li")) == 4,
         message="the ingestion job did not finish")
    assert find(browser, "#upload").get_attribute("data-state") == "partial"  # the job ended, one file failed
    assert float(find(browser, "#upload-progress").get_attribute("value")) == 1
    assert find(browser, "#upload-label").text == "Done: 3 ingested, 1 failed, 1 with warnings."
    results = browser.find_elements(By.CSS_SELECTOR, "#upload-results > li")
    assert [li.get_attribute("data-status") for li in results] == ["new", "new", "failed", "new"]
    assert results[2].text.startswith("empty.txt: failed (") and len(results[2].text) > 25  # with its reason
    [warning] = results[3].find_elements(By.CSS_SELECTOR, ".warning")  # ingested, and what it could not give
    assert warning.text.startswith("2 of 4 pages are page-sized images") and warning.text.endswith("page 2, 4")
    assert not results[0].find_elements(By.CSS_SELECTOR, ".warning")
    rows = wait(browser, lambda d: len(found := d.find_elements(By.CSS_SELECTOR, "#documents tbody tr")) == 6 and found)
    names = {PurePath(row.find_element(By.CSS_SELECTOR, "th").text.split("\n")[0]).name: row for row in rows}
    assert {"wombat-notes.md", "ntsb-report.pdf", "signed.pdf"} <= set(names)
    [kept] = names["signed.pdf"].find_elements(By.CSS_SELECTOR, ".warning")  # the listing keeps saying so
    assert kept.text == warning.text and not names["wombat-notes.md"].find_elements(By.CSS_SELECTOR, ".warning")
    screenshot("documents")

    row = names["wombat-notes.md"]
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    visible(browser, "#confirm")
    find(browser, "#confirm-cancel").click()  # nothing happens without confirmation
    assert len(browser.find_elements(By.CSS_SELECTOR, "#documents tbody tr")) == 6
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    visible(browser, "#confirm-ok").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#documents tbody tr")) == 5)
    assert "wombat-notes.md" not in find(browser, "#documents tbody").text
    assert find(browser, "#documents-status").text.startswith("Deleted ")
    assert find(browser, "#documents-status").text.endswith("wombat-notes.md.")


def test_the_original_pdf_is_served_so_it_cannot_run_script(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    documents = httpx.get(f"{server}/v1/documents", headers=auth).json()["documents"]
    pdf = next(d for d in documents if d["source"].endswith("ntsb-report.pdf"))
    response = httpx.get(f"{server}/v1/documents/{pdf['doc_id']}/file", headers=auth)
    assert response.status_code == 200 and response.content.startswith(b"%PDF")
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"].startswith("inline")
    assert response.headers["content-security-policy"].startswith("sandbox")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{server}/v1/documents/{pdf['doc_id']}/file").status_code == 401


def ask_briefly(browser, question: str):
    """A fresh thread, BM25, 4 new tokens: the answer's sources are what these tests look at."""
    tab(browser, "ask")
    max_new_tokens(browser, 4)
    Select(find(browser, "#opt-retriever")).select_by_value("bm25")
    find(browser, "#new-thread").click()
    find(browser, "#question").send_keys(question + Keys.ENTER)
    turn = wait(browser, lambda d: (done := d.find_elements(By.CSS_SELECTOR, ".turn[data-state=done]")) and done[0])
    sources = turn.find_element(By.CSS_SELECTOR, "details.sources")
    if sources.get_attribute("open") is None:
        sources.find_element(By.CSS_SELECTOR, "summary").click()
    return sources.find_elements(By.CSS_SELECTOR, "button.source")


def test_a_pdf_source_opens_at_its_page(server, browser):
    sources = ask_briefly(browser, "How many total flight hours did the pilot have?")
    source = next(b for b in sources if "ntsb-report.pdf" in b.text)
    page = int(source.text.split("page ")[1].split()[0])
    source.click()
    visible(browser, "#passage")
    assert f"page {page}" in find(browser, "#passage-meta").text
    main_window = browser.current_window_handle
    visible(browser, "#passage-open").click()
    wait(browser, lambda d: len(d.window_handles) == 2, 20, "the PDF did not open")
    browser.switch_to.window(next(h for h in browser.window_handles if h != main_window))
    try:  # the browser's own PDF viewer, at the cited page
        assert browser.current_url.startswith("blob:") and browser.current_url.endswith(f"#page={page}")
        assert browser.execute_script("return document.contentType") == "application/pdf"
    finally:
        browser.close()
        browser.switch_to.window(main_window)
    find(browser, "#passage-close").click()


def test_script_in_a_document_is_shown_as_text(server, browser, tmp_path):
    payload = ("The zebra-quota allows 42 requests an hour. <script>document.title='pwned'</script>"
               "<img src=x onerror=\"document.title='pwned'\"> End of the zebra note.")
    note = tmp_path / "zebra.txt"
    note.write_text(payload + "\n")
    tab(browser, "documents")
    find(browser, "#file-input").send_keys(str(note))
    wait(browser, lambda d: "zebra.txt: new" in find(d, "#upload-results").text, message="zebra.txt not ingested")
    sources = ask_briefly(browser, "What does the zebra-quota allow?")
    source = next(b for b in sources if "zebra.txt" in b.text)
    source.click()
    visible(browser, "#passage")
    wait(browser, lambda d: "<script>" in find(d, "#passage-text").text, 20)
    assert not browser.find_elements(By.CSS_SELECTOR, "#passage-text script, #passage-text img")
    assert browser.title == "rag-service"
    find(browser, "#passage-close").click()


def test_evaluation_reports_are_listed_and_rendered(server, browser, screenshot):
    tab(browser, "evals")
    reports = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-list button.eval"), 20)
    names = [button.get_attribute("data-name") for button in reports]
    assert "xquad" in names
    reports[names.index("xquad")].click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-report table"), 20)
    assert find(browser, "#eval-report h2").text.startswith("Evaluation")
    wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#eval-report img')].every(i => i.complete && i.naturalWidth > 0)"
        " && document.querySelectorAll('#eval-report img').length > 0"), 20)
    screenshot("evaluations")


def test_readable_at_phone_width(server, browser, screenshot):
    viewport(browser, 390, 800, mobile=True)
    try:
        tab(browser, "ask")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
        screenshot("phone")
        tab(browser, "documents")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#documents tbody tr"), 20)
        deletes = browser.execute_script("return [...document.querySelectorAll('#documents button.danger')]"
                                         ".map((button) => button.getBoundingClientRect().toJSON())")
        assert deletes and all(0 <= rect["left"] and rect["right"] <= 390 for rect in deletes), deletes
        screenshot("phone-documents")
    finally:
        viewport(browser, *WINDOW)


# ------------------------------------------------------------------------------ evidence and page images
NORTHWIND_ROW = "| Net sales | 1,250 | 1,100 | 14% |"  # tests/pdfs.py report_with_table, page 2
NORTHWIND_COVER = "This report describes the results of the quarter in words and numbers."  # its page 1
AUTH_HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def northwind(server) -> str:
    """A two-page PDF (a cover, then a table) in the module's index: its doc_id."""
    import time

    accepted = httpx.post(f"{server}/v1/documents", headers=AUTH_HEADERS,
                          files=[("files", ("northwind.pdf", report_with_table()))]).json()
    deadline = time.monotonic() + WAIT_S
    while (job := httpx.get(f"{server}/v1/jobs/{accepted['job_id']}", headers=AUTH_HEADERS).json())["status"] not in (
            "succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    return job["files"][0]["doc_id"]


def signed_in(browser, server: str) -> None:
    """The app open with the key (typed again only when this origin's tab has none)."""
    browser.get(server)
    wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'")
         or find(d, "#login-key").is_displayed(), 20)
    if find(browser, "#login-key").is_displayed():
        find(browser, "#login-key").send_keys(KEY + Keys.ENTER)
        wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"), 20)
    tab(browser, "ask")
    find(browser, "#new-thread").click()


def last_turn(browser, count: int):
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn[data-state=done]")) == count)
    return browser.find_elements(By.CSS_SELECTOR, ".turn")[-1]


def shown_page(browser) -> tuple[str, dict, int]:
    """The page image on screen, once loaded: the route it was fetched from, its query, and its width in pixels."""
    from urllib.parse import parse_qs, urlsplit

    img = visible(browser, "#page-image")
    wait(browser, lambda d: d.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0", img),
         20, "the page image did not load")
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)"
                                     ".filter((name) => name.includes('/pages/')).at(-1)")
    url = urlsplit(fetched)
    return url.path, {key: values[0] for key, values in parse_qs(url.query).items()}, img.get_property("naturalWidth")


def page_png(server: str, doc_id: str, page: int, highlight: str = "") -> bytes:
    response = httpx.get(f"{server}/v1/documents/{doc_id}/pages/{page}.png", params={"highlight": highlight} if
                         highlight else None, headers=AUTH_HEADERS)
    assert response.status_code == 200, response.text
    return response.content


def test_an_answer_shows_its_evidence_and_the_page_image(server, browser, northwind, screenshot):
    from PIL import Image

    signed_in(browser, server)
    max_new_tokens(browser, 4)
    Select(find(browser, "#opt-retriever")).select_by_value("bm25")
    find(browser, "#question").send_keys("What were Northwind net sales in 2024?" + Keys.ENTER)
    turn = last_turn(browser, 1)
    answer = browser.execute_script("return JSON.parse(sessionStorage.getItem('rag-thread')).at(-1).answer")
    assert answer["evidence"], answer  # the table's row or sentence that answers it
    items = turn.find_elements(By.CSS_SELECTOR, ".evidence li")
    assert len(items) == len(answer["evidence"])
    for item, evidence in zip(items, answer["evidence"]):
        assert evidence["source"] in item.text and (evidence["kind"] == "code" or evidence["readable"] in item.text)
    pdf = next(i for i, e in enumerate(answer["evidence"]) if e["source"] == "northwind.pdf")
    evidence = answer["evidence"][pdf]
    items[pdf].find_element(By.CSS_SELECTOR, "button.show-page").click()
    view = visible(browser, "#page-view")
    assert find(browser, "#page-title").text == f"northwind.pdf · page {evidence['page']}"
    assert view.get_attribute("data-page") == str(evidence["page"]) and view.get_attribute("data-doc-id") == northwind
    path, query, width = shown_page(browser)
    assert path == f"/v1/documents/{northwind}/pages/{evidence['page']}.png" and query == {"highlight": evidence["quote"]}
    assert width == Image.open(io.BytesIO(page_png(server, northwind, evidence["page"]))).width
    conversation = find(browser, "#panel-ask").rect
    assert view.rect["x"] >= conversation["x"] + conversation["width"]  # beside the conversation, not over it
    screenshot("evidence")
    find(browser, "#page-close").click()
    assert not find(browser, "#page-view").is_displayed()


def test_an_unsupported_answer_shows_no_citation(server, browser):
    signed_in(browser, server)
    source = made_up_answer()["sources"][0]
    # Even were a citation sent with it, an answer found in no source is never shown as what a source says.
    stub_next_answer(browser, made_up_answer(answer="Net sales were **9,999** [1].", supported=False,
                                             citations=[source]))
    find(browser, "#question").send_keys("What were net sales?" + Keys.ENTER)
    turn = last_turn(browser, 1)
    text = turn.find_element(By.CSS_SELECTOR, ".answer-text")
    assert text.text == "Net sales were 9,999 [1]." and text.find_element(By.CSS_SELECTOR, "strong").text == "9,999"
    assert not turn.find_elements(By.CSS_SELECTOR, "button.cite")
    assert "unsupported" in text.get_attribute("class")
    assert turn.find_element(By.CSS_SELECTOR, ".unsupported-note").text.startswith("Not verified")


def test_a_truncated_answer_is_marked_and_its_markdown_rendered(server, browser):
    signed_in(browser, server)
    source = made_up_answer()["sources"][0]
    answer = ("Set a timeout on the client [1]:\n```python\nclient = httpx.Client(timeout=5.0)\n``` [1]\n"
              "<b>not bold</b> and [2] (not cited)")
    stub_next_answer(browser, made_up_answer(answer=answer, citations=[source], finish_reason="length"))
    find(browser, "#question").send_keys("How do I set a timeout?" + Keys.ENTER)
    turn = last_turn(browser, 1)
    text = turn.find_element(By.CSS_SELECTOR, ".answer-text")
    assert text.find_element(By.CSS_SELECTOR, "pre code").text == "client = httpx.Client(timeout=5.0)"
    assert [b.text for b in text.find_elements(By.CSS_SELECTOR, "button.cite")] == ["[1]", "[1]"]  # [2]: not cited
    assert "<b>not bold</b> and [2]" in text.text and not text.find_elements(By.CSS_SELECTOR, "b")
    assert turn.find_element(By.CSS_SELECTOR, ".truncated").text.startswith("Truncated:")
    assert not turn.find_elements(By.CSS_SELECTOR, ".unsupported-note")


def test_a_pdf_evidence_item_opens_the_page_of_its_quoted_words(server, browser, northwind):
    from PIL import Image

    signed_in(browser, server)
    source = {**made_up_answer()["sources"][0], "source": "northwind.pdf", "page": 1, "heading": None}
    evidence = [{"number": 1, "chunk_id": None, "doc_id": northwind, "source": "northwind.pdf", "page": page,
                 "start": 0, "end": len(quote), "quote": quote, "kind": kind, "header": "", "score": 1.0,
                 "readable": readable}
                for page, quote, kind, readable in (
                    (2, NORTHWIND_ROW, "row", "Net sales: 1,250 (2024); 1,100 (2023)"),
                    (1, NORTHWIND_COVER, "sentence", NORTHWIND_COVER))]
    stub_next_answer(browser, made_up_answer(answer="Net sales: 1,250 (2024) [1]", citations=[source],
                                             sources=[source], evidence=evidence))
    find(browser, "#question").send_keys("What were net sales in 2024?" + Keys.ENTER)
    turn = last_turn(browser, 1)
    buttons = turn.find_elements(By.CSS_SELECTOR, ".evidence button.show-page")
    assert [b.text for b in buttons] == ["Show page 2", "Show page 1"]  # the quote's page, not its source's (1)
    for button, page, quote in ((buttons[0], 2, NORTHWIND_ROW), (buttons[1], 1, NORTHWIND_COVER)):
        button.click()
        wait(browser, lambda d: find(d, "#page-view").get_attribute("data-page") == str(page), 20)
        path, query, width = shown_page(browser)
        assert path == f"/v1/documents/{northwind}/pages/{page}.png" and query == {"highlight": quote}
        highlighted = page_png(server, northwind, page, quote)  # what was shown: that page, the quote highlighted ...
        assert highlighted != page_png(server, northwind, page)  # ... where it stands on it
        assert width == Image.open(io.BytesIO(highlighted)).width
