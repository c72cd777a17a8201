"""Hostile input: files over a limit, or past the parse worker's budget, fail alone with a reason that names the
setting; the files beside them and the jobs behind them are ingested; memory stays bounded.

Every hostile file is generated here (small on disk); limits are lowered where a real one would take long to build.
"""

from __future__ import annotations

import os
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from ingest.job import IngestJob
from ingest.runner import INCOMING, JobRunner
from ingest.sandbox import ParsePool
from rag.store.jobs import JobLog

GOOD = "# Wombats\n\nWombats dig long burrows with their strong claws and sleep in them by day.\n"
PEAK_MEMORY_BYTES = int(2.5 * (1 << 30))
# A text file that takes the parse worker well over PARSE_BUDGET_S (unstructured reads 5,000 such paragraphs in
# over a minute on 2 busy cores: its time grows faster than the text).
HEAVY_PARAGRAPHS = 3_000
PARSE_BUDGET_S = 3.0
MARGIN_S = 20.0  # embedding the neighbour, committing, a replacement worker


class PeakMemory:
    """The largest memory (PSS: shared pages split between the processes sharing them) of this process and its
    descendants (parse workers, their forkserver), sampled while the block runs; `added`: above what they held when
    it began (in a whole test session the process also holds models and servers of other tests)."""

    def __init__(self, every_s: float = 0.1):
        self.every_s = every_s
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except psutil.Error:  # ended meanwhile
                pass
        return total

    def _watch(self) -> None:
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, self._sample())

    @property
    def added(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture(scope="module", autouse=True)
def parse_workers_ready():
    """Start the parse workers' forkserver (it loads the parsers: seconds) before any test times a job."""
    with ParsePool(1, timeout_s=600, memory_mb=4096) as pool:
        pool.call(os.getpid)


def _by_name(report) -> dict:
    return {Path(result.source).name: result for result in report.files}


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.md").write_text(GOOD)
    return folder


def _zip_bomb(path: Path, expanded_mb: int) -> None:
    """A .docx of a few hundred KB whose document.xml inflates to `expanded_mb`: its central directory says so."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            block = b" " * (1 << 20)
            for _ in range(expanded_mb):
                member.write(block)


def _heavy_text(path: Path) -> None:
    path.write_text("\n\n".join(f"Paragraph {number} tells of item {number} in a few more words."
                                for number in range(HEAVY_PARAGRAPHS)))


def test_zip_bomb_fails_from_its_central_directory(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    _zip_bomb(folder / "bomb.docx", expanded_mb=64)
    assert (folder / "bomb.docx").stat().st_size < 1 << 20
    settings = settings.with_overrides(max_expanded_mb=16)
    with PeakMemory() as memory:
        report = IngestJob(settings, embedder).run(folder)
    results = _by_name(report)
    assert results["bomb.docx"].status == "failed"
    assert results["bomb.docx"].error == "64.0 MB expanded exceed the limit of 16 MB (RAG_MAX_EXPANDED_MB)"
    assert results["good.md"].status == "new" and results["good.md"].chunks == 1
    assert memory.added < PEAK_MEMORY_BYTES


def test_zip_with_too_many_members_fails(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    with zipfile.ZipFile(folder / "many.pptx", "w") as archive:
        for number in range(50):
            archive.writestr(f"ppt/slides/slide{number}.xml", "<p/>")
    report = IngestJob(settings.with_overrides(max_zip_members=20), embedder).run(folder)
    assert _by_name(report)["many.pptx"].error == "50 archive members exceed the limit of 20 (RAG_MAX_ZIP_MEMBERS)"
    assert _by_name(report)["good.md"].status == "new"


def test_sheet_over_the_row_and_cell_limits_fails(tmp_path, settings, embedder):
    openpyxl = pytest.importorskip("openpyxl")
    folder = _folder(tmp_path)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for row in range(1, 301):
        sheet.append([f"item {row}", row, row * 2])
    workbook.save(folder / "report.xlsx")

    rows = IngestJob(settings.with_overrides(max_sheet_rows=100), embedder).run(folder)
    assert _by_name(rows)["report.xlsx"].error == \
        "sheet 'sheet1': 300 rows exceed the limit of 100 (RAG_MAX_SHEET_ROWS)"
    assert _by_name(rows)["good.md"].status == "new"
    cells = IngestJob(settings.with_overrides(max_sheet_cells=500), embedder).run(folder)
    assert _by_name(cells)["report.xlsx"].error == \
        "sheet 'sheet1': 900 cells exceed the limit of 500 (RAG_MAX_SHEET_CELLS)"
    within = IngestJob(settings, embedder).run(folder)  # the default limits: it is read
    assert _by_name(within)["report.xlsx"].status == "new" and _by_name(within)["report.xlsx"].chunks > 0


def test_file_over_the_size_limit_fails_before_it_is_read(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    (folder / "big.txt").write_text("Words. " * 300_000)  # 2.1 MB
    report = IngestJob(settings.with_overrides(max_file_mb=1), embedder).run(folder)
    assert _by_name(report)["big.txt"].error == "2.0 MB exceed the limit of 1 MB (RAG_MAX_FILE_MB)"
    assert _by_name(report)["good.md"].status == "new"


def test_document_over_the_character_limit_fails(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    (folder / "long.md").write_text("# Long\n\n" + "A sentence of words. " * 1000)
    report = IngestJob(settings.with_overrides(max_document_chars=10_000), embedder).run(folder)
    assert _by_name(report)["long.md"].error == \
        "21,008 characters exceed the limit of 10,000 (RAG_MAX_DOCUMENT_CHARS)"
    assert _by_name(report)["good.md"].status == "new"


def test_deep_html_is_read_whole_with_a_warning(tmp_path, settings, embedder):
    from ingest.limits import Limits
    from ingest.load import load

    folder = _folder(tmp_path)
    depth = 50_000
    (folder / "deep.html").write_text(
        "<html><body><p>Aardvarks eat termites.</p>" + "<div>" * depth + "<p>Bilbies live in deserts.</p>"
        + "</div>" * depth + "<p>Cassowaries cannot fly.</p></body></html>")
    document = load(folder / "deep.html", limits=Limits.from_settings(settings))
    text = " ".join(element.text for element in document.elements)
    assert all(animal in text for animal in ("Aardvarks", "Bilbies", "Cassowaries"))  # all three paragraphs
    assert document.warnings == (
        "HTML nested 50,003 elements deep: the elements below a depth of 200 (RAG_MAX_NESTING_DEPTH) were merged "
        "into the one above them; their text is indexed, their structure (headings, lists, tables) may be lost",)

    result = _by_name(IngestJob(settings, embedder).run(folder))["deep.html"]
    assert result.status == "new" and result.warnings == document.warnings


def test_links_out_of_the_folder_are_listed_not_followed(tmp_path, settings, embedder):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.md").write_text("# Secret\n\nThe vault code is eleven.\n")
    (outside / "sub" / "other.md").write_text("# Other\n\nThe other vault code is twelve.\n")
    folder = _folder(tmp_path)
    (folder / "secret.md").symlink_to(outside / "secret.md")
    (folder / "elsewhere").symlink_to(outside / "sub", target_is_directory=True)
    (folder / ".notes").mkdir()  # hidden: not ingested itself, but a link into it stays inside the folder
    (folder / ".notes" / "inner.md").write_text("# Inner\n\nInner notes about numbats.\n")
    (folder / "inner-link.md").symlink_to(folder / ".notes" / "inner.md")

    report = IngestJob(settings, embedder).run(folder)
    results = _by_name(report)
    assert results["secret.md"].status == "skipped"
    assert results["secret.md"].error == (f"symbolic link to the file {outside / 'secret.md'}, outside the ingested "
                                          "folder: not followed (--follow-links follows it)")
    assert results["elsewhere"].status == "skipped" and results["elsewhere"].error.startswith(
        f"symbolic link to the folder {outside / 'sub'}, outside the ingested folder")
    assert results["good.md"].status == results["inner-link.md"].status == "new"
    assert report.index_counts["documents"] == 2

    followed = IngestJob(settings, embedder).run(folder, follow_links=True)
    assert {name: result.status for name, result in _by_name(followed).items()} == {
        "good.md": "unchanged", "inner-link.md": "unchanged", "secret.md": "new", "other.md": "new"}


def test_file_that_yields_no_text_is_a_warning_not_a_silent_new(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    # every line reads as a heading, and a heading alone is no chunk
    (folder / "accounts.txt").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/bin/sh\n")
    result = _by_name(IngestJob(settings, embedder).run(folder))["accounts.txt"]
    assert result.status == "new" and result.chunks == 0
    assert result.warnings == ("no text indexed: the parser read 2 element(s) and none became searchable text, so "
                               "search will not find this document",)


def test_file_past_the_time_budget_fails_and_the_next_is_ingested(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    _heavy_text(folder / "a-heavy.txt")  # first, so good.md waits behind it
    settings = settings.with_overrides(parse_timeout_s=PARSE_BUDGET_S)
    started = time.monotonic()
    with PeakMemory() as memory:
        report = IngestJob(settings, embedder).run(folder)
    results = _by_name(report)
    assert results["a-heavy.txt"].status == "failed"
    assert results["a-heavy.txt"].error == ("parsing took longer than 3 s, the limit per file (RAG_PARSE_TIMEOUT_S); "
                                            "stopped")
    assert results["good.md"].status == "new"
    assert time.monotonic() - started < PARSE_BUDGET_S + MARGIN_S
    assert memory.added < PEAK_MEMORY_BYTES


def test_file_past_the_memory_budget_fails_and_the_next_is_ingested(tmp_path, settings, embedder):
    folder = _folder(tmp_path)
    # 14 MB of short lines, within the character limit: the parser's elements take far more than 128 MB
    (folder / "a-big.txt").write_text("\n\n".join(f"Line {number} of many." for number in range(700_000)))
    settings = settings.with_overrides(parse_memory_mb=128, parse_timeout_s=120)
    with PeakMemory() as memory:
        report = IngestJob(settings, embedder).run(folder)
    results = _by_name(report)
    assert results["a-big.txt"].status == "failed"
    assert results["a-big.txt"].error == ("parsing needed more than 128 MB of memory, the limit per file "
                                          "(RAG_PARSE_MEMORY_MB); stopped")
    assert results["good.md"].status == "new"
    assert memory.added < PEAK_MEMORY_BYTES


# ------------------------------------------------------------------------------------------------ uploads and jobs
def _upload(runner: JobRunner, files: dict[str, bytes]) -> str:
    """Save and record an upload as POST /v1/documents does (names sanitised the same way); returns the job id."""
    from api.jobs import sanitize_filename

    job_id = f"job-{time.monotonic_ns()}"
    names = [sanitize_filename(name) for name in files]
    for name, data in zip(names, files.values()):
        (runner.incoming_dir(job_id) / name).write_bytes(data)
    runner.record_upload(job_id, names, "default")
    return job_id


def test_uploads_from_different_client_folders_do_not_replace_each_other(settings, embedder):
    runner = JobRunner(settings, embedder)
    first = _upload(runner, {"a\\x.md": b"# X\n\nThe first x is about apples.\n"})
    second = _upload(runner, {"b\\x.md": b"# X\n\nThe second x is about bananas.\n"})
    for job_id in (first, second):
        runner.run(runner.get(job_id))
    jobs = [runner.get(job_id) for job_id in (first, second)]
    assert [job.files[0].status for job in jobs] == ["new", "new"]
    assert jobs[0].files[0].filename != jobs[1].files[0].filename
    assert jobs[0].files[0].filename.startswith("a_x") and jobs[1].files[0].filename.startswith("b_x")
    assert runner.get(second).index["documents"] == 2


def test_job_with_a_failed_file_is_partial(settings, embedder):
    runner = JobRunner(settings, embedder)
    job_id = _upload(runner, {"good.md": GOOD.encode(), "broken.pdf": b"%PDF-1.4 not really a pdf"})
    runner.run(runner.get(job_id))
    job = runner.get(job_id)
    assert job.status == "partial" and job.error == "1 of 2 files failed; the others were ingested"
    assert [(f.filename, f.status) for f in job.files] == [("good.md", "new"), ("broken.pdf", "failed")]
    assert job.files[1].error
    assert job.to_dict()["status"] == "partial"


def test_upload_behind_a_runaway_file_waits_no_longer_than_its_budget(settings, embedder, tmp_path):
    settings = settings.with_overrides(parse_timeout_s=PARSE_BUDGET_S)
    heavy = tmp_path / "heavy.txt"
    _heavy_text(heavy)
    runner = JobRunner(settings, embedder)
    runaway = _upload(runner, {"heavy.txt": heavy.read_bytes()})
    behind = _upload(runner, {"good.md": GOOD.encode()})
    started = time.monotonic()
    for job_id in (runaway, behind):
        runner.run(runner.get(job_id))
    assert runner.get(behind).status == "succeeded" and runner.get(behind).files[0].status == "new"
    assert time.monotonic() - started < PARSE_BUDGET_S + MARGIN_S
    assert runner.get(runaway).status == "partial"
    assert "RAG_PARSE_TIMEOUT_S" in runner.get(runaway).files[0].error


def _crashed_while_running(log: JobLog, job_id: str) -> None:
    """As the job log holds a job whose process died mid-run: running, owned by a process that no longer exists."""
    job = log.get(job_id)
    assert log.claim(job)
    job.owner = "1:0.00"  # pid 1 never started at time 0: not alive
    log.save(job)


def test_after_a_restart_the_upload_behind_a_runaway_file_is_ingested_within_its_budget(settings, embedder,
                                                                                         tmp_path):
    settings = settings.with_overrides(parse_timeout_s=PARSE_BUDGET_S)
    heavy = tmp_path / "heavy.txt"
    _heavy_text(heavy)
    before = JobRunner(settings, embedder)
    runaway = _upload(before, {"heavy.txt": heavy.read_bytes()})
    behind = _upload(before, {"good.md": GOOD.encode()})
    _crashed_while_running(before.log, runaway)

    after = JobRunner(settings, embedder)  # the server starts again
    started = time.monotonic()
    resumed = after.recover()
    assert [job.id for job in resumed] == [runaway, behind]  # the crashed job first, as it was
    for job in resumed:
        after.run(job)
    assert after.get(behind).status == "succeeded" and after.get(behind).files[0].status == "new"
    assert time.monotonic() - started < PARSE_BUDGET_S + MARGIN_S
    assert after.get(runaway).status == "partial" and after.get(runaway).attempts == 2


def test_a_job_that_crashed_its_process_every_time_is_failed_not_resumed(settings, embedder):
    runner = JobRunner(settings, embedder)
    crashing = _upload(runner, {"crash.md": GOOD.encode()})
    behind = _upload(runner, {"good.md": GOOD.encode()})
    for _ in range(settings.job_max_attempts):
        _crashed_while_running(runner.log, crashing)

    resumed = JobRunner(settings, embedder).recover()
    assert [job.id for job in resumed] == [behind]
    job = runner.get(crashing)
    assert job.status == "failed" and job.error == (
        "gave up after 3 attempts: the process running this job ended before it finished each time "
        "(RAG_JOB_MAX_ATTEMPTS is 3)")
    assert job.files[0].status == "failed"
    assert not (settings.upload_root / INCOMING / crashing).exists()  # its saved files are cleared


def test_rag_ingest_lists_links_and_limits_and_rag_info_shows_the_limits(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from cli import EXIT_FILES_FAILED, EXIT_OK, app

    (tmp_path / "secret.md").write_text("# Secret\n\nThe vault code is eleven.\n")
    folder = _folder(tmp_path)
    (folder / "secret.md").symlink_to(tmp_path / "secret.md")
    (folder / "big.txt").write_text("Words. " * 300_000)
    index = tmp_path / "index"
    monkeypatch.setenv("RAG_MAX_FILE_MB", "1")
    cli = CliRunner()

    result = cli.invoke(app, ["ingest", str(folder), "--index", str(index), "--json"])
    assert result.exit_code == EXIT_FILES_FAILED, result.output
    results = {Path(r["source"]).name: r for r in json.loads(result.stdout)["results"]}
    assert results["secret.md"]["status"] == "skipped" and "--follow-links" in results["secret.md"]["error"]
    assert results["big.txt"]["error"] == "2.0 MB exceed the limit of 1 MB (RAG_MAX_FILE_MB)"
    assert results["good.md"]["status"] == "new"
    (job,) = JobLog(index).db.execute("SELECT status, error FROM jobs").fetchall()
    assert job == ("partial", "1 of 3 files failed; the others were ingested")

    result = cli.invoke(app, ["ingest", str(folder), "--index", str(index), "--follow-links", "--json",
                              "--exclude", "big.txt"])
    assert result.exit_code == EXIT_OK, result.output
    assert {Path(r["source"]).name: r["status"] for r in json.loads(result.stdout)["results"]} == {
        "good.md": "unchanged", "secret.md": "new"}

    result = cli.invoke(app, ["info", "--index", str(index), "--json"])
    limits = json.loads(result.stdout)["ingest_limits"]
    assert limits["RAG_MAX_FILE_MB"] == 1 and limits["RAG_MAX_SHEET_ROWS"] == 100_000
    assert set(limits) == {"RAG_MAX_FILE_MB", "RAG_MAX_EXPANDED_MB", "RAG_MAX_ZIP_MEMBERS", "RAG_MAX_SHEET_ROWS",
                           "RAG_MAX_SHEET_CELLS", "RAG_MAX_PDF_PAGES", "RAG_MAX_DOCUMENT_CHARS",
                           "RAG_MAX_NESTING_DEPTH", "RAG_PARSE_TIMEOUT_S", "RAG_PARSE_MEMORY_MB"}
