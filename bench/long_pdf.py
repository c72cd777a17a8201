"""One long PDF parsed in-process against its pages read across worker processes (`ingest/job.py`, PAGES_PER_TASK).

    .venv/bin/python bench/long_pdf.py [--dataset ../shared/datasets/financebench-dev] [--files 6] [--repeats 3]

The long PDF is the dataset's longest filings joined into one file with pypdfium2 (a filing bundle, an annual
report with exhibits). Each way is timed on the same file in the same run, best of `--repeats`, after one warm-up
(worker start-up is counted, spawned as `rag ingest` spawns them: a pool is started per ingestion job); the elements must come out equal.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, shared_dataset  # noqa: E402
from ingest.job import PAGES_PER_TASK  # noqa: E402
from ingest.pdf import parse_pdf  # noqa: E402


def joined_pdf(files: list[Path], target: Path) -> int:
    import pypdfium2 as pdfium

    joined = pdfium.PdfDocument.new()
    for path in files:
        source = pdfium.PdfDocument(str(path))
        joined.import_pages(source)
        source.close()
    joined.save(str(target))
    pages = len(joined)
    joined.close()
    return pages


def timed(parse, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = parse()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--files", type=int, default=6, help="longest filings joined into the one PDF")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = (args.dataset or shared_dataset("financebench-dev")) / "pdfs"
    files = sorted(folder.glob("*.pdf"), key=lambda path: -path.stat().st_size)[:args.files]
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-long-pdf-") as workdir:
        path = Path(workdir) / "joined.pdf"
        pages = joined_pdf(files, path)
        parse_pdf(path)  # warm the page cache and pdfium
        serial, reference = timed(lambda: parse_pdf(path), args.repeats)
        rows = [["in-process (1 worker)", pages, f"{serial:.2f}", f"{pages / serial:.0f}", "1.00×", "yes"]]
        for workers in sorted({2, os.cpu_count() or 2}):
            def across_workers(workers=workers):
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    return parse_pdf(path, pool.map, PAGES_PER_TASK)

            seconds, parsed = timed(across_workers, args.repeats)
            rows.append([f"{workers} workers, {PAGES_PER_TASK} pages a task", pages, f"{seconds:.2f}",
                         f"{pages / seconds:.0f}", f"{serial / seconds:.2f}×", "yes" if parsed == reference else "NO"])
    print(f"\n{len(files)} filings joined: {', '.join(path.stem for path in files)}\n")
    print(markdown_table(["parse", "pages", "s (best)", "pages/s", "speed-up", "same elements"], rows))


if __name__ == "__main__":
    main()
