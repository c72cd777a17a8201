"""Scanned documents: OCR speed and character error rate, and retrieval on scanned copies against the originals.

    nice .venv/bin/python bench/ocr.py [--dataset ../shared/datasets/financebench-dev]
        [--usgov ../shared/datasets/usgov-pdfs] [--pages 20] [--usgov-pages 4] [--dpi 150 --dpi 200]
        [--corpus gold|all]

One process, one run:

1. Pages: financebench-dev questions in file order, at most one per filing, until their evidence pages number
   `--pages`; plus the first page with text of the first `--usgov-pages` US agency PDFs. Every page has a text layer.
2. Scans: for each `--dpi`, a copy of each of those PDFs whose chosen pages are replaced by their rendering at that
   resolution, alone on the page (an image-only page, as a scanner makes; page numbers unchanged).
3. OCR: the scanned pages read by ingest/pdf.py's `read_pages` (OCR at ingest/ocr.py's OCR_DPI) in 2 worker processes
   at once, as ingestion's parse workers would: pages/s (wall), CPU seconds per page (workers + tesseract), and the
   character error rate of the recognised lines against the page's text layer read the same way (edit distance over
   the reference's characters, whitespace removed: a scan does not show where a text layer put its spaces).
4. Retrieval: the filings (`--corpus gold`: those of the chosen questions; `all`: every filing, the others unchanged)
   ingested twice by `IngestJob`, originals and 200 dpi scans, and the chosen questions asked of each: document
   hit@1/@5 and evidence-page hit@5 (bench/documents.py's `score`), dense, BM25 and hybrid.
5. Digital PDFs: the original filings parsed with OCR auto and with it off (best of 4 rounds, alternating which goes
   first): pages with a text layer are never OCR'd, so the two should take the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, mean, shared_dataset  # noqa: E402
from bench.documents import DEPTH, score  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from ingest.ocr import OcrOptions, add_image_page, unavailable  # noqa: E402
from ingest.pdf import parse_pdf  # noqa: E402
from ingest.pdf_text import page_count, read_pages  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.retrieve import Retriever, RetrieverKind  # noqa: E402
from rag.store import Store  # noqa: E402
from rag.types import DEFAULT_COLLECTION  # noqa: E402

OPTIONS = OcrOptions.from_settings(Settings(ocr="auto"))


def choose(dataset: Path, usgov: Path, pages: int, usgov_pages: int) -> tuple[list[dict], dict[Path, list[int]]]:
    """The chosen questions and, per PDF, the 0-based pages to scan."""
    questions, chosen, scanned = [json.loads(line) for line in (dataset / "questions.jsonl").open()], [], {}
    for question in questions:
        path = dataset / "pdfs" / f"{question['doc_name']}.pdf"
        if path in scanned or sum(map(len, scanned.values())) >= pages:
            continue
        chosen.append(question)
        scanned[path] = sorted({e["page"] for e in question["evidence"] if e["doc_name"] == question["doc_name"]})
    for path in sorted(usgov.rglob("*.pdf"))[:usgov_pages]:
        number = next(i for i, page in enumerate(read_pages(str(path), 0, min(5, page_count(path)))) if page.lines)
        scanned[path] = [number]
    return chosen, scanned


def scan_copy(source: Path, pages: list[int], dpi: int, target: Path) -> None:
    """`source` with `pages` replaced by their rendering at `dpi`, alone on the page (no text layer)."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(source))
    try:
        for number in pages:
            page = document[number]
            image = page.render(scale=dpi / 72, grayscale=True).to_pil()
            page.close()
            document.del_page(number)
            add_image_page(document, image, dpi, number)
        document.save(str(target))
    finally:
        document.close()


def page_text(path: str, number: int, options: OcrOptions | None) -> tuple[str, float | None]:
    """One page's lines as ingestion reads them, whitespace removed, and its OCR confidence."""
    [page] = read_pages(path, number, number + 1, options)
    return "".join("".join(line.text.split()) for line in page.lines), page.ocr and page.ocr.confidence


def ocr_run(originals: dict[Path, list[int]], copies: dict[Path, Path]) -> dict:
    from rapidfuzz.distance import Levenshtein

    tasks = [(path, number) for path, numbers in originals.items() for number in numbers]
    references = [page_text(str(path), number, None)[0] for path, number in tasks]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:  # two parse workers, as on these 2 cores
        results = list(pool.map(page_text, [str(copies[path]) for path, _ in tasks], [n for _, n in tasks],
                                [OPTIONS] * len(tasks)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    errors = sum(Levenshtein.distance(text, reference) for (text, _), reference in zip(results, references))
    characters = sum(map(len, references))
    worst = max((Levenshtein.distance(t, r) / max(1, len(r)), f"{p.stem} p{n}")
                for (t, _), r, (p, n) in zip(results, references, tasks))
    return {"pages": len(tasks), "pages/s": len(tasks) / wall, "cpu s/page": cpu / len(tasks),
            "CER": errors / characters, "worst": f"{worst[0]:.3f} ({worst[1]})",
            "confidence": mean([confidence or 0.0 for _, confidence in results])}


def retrieval(files: list[Path], questions: list[dict], embedder: Embedder, workdir: Path, name: str) -> dict:
    corpus = workdir / f"corpus-{name}"
    corpus.mkdir()
    for path in files:
        (corpus / path.name).symlink_to(path.resolve())
    settings = Settings(index_dir=workdir / f"index-{name}", ocr="auto")
    report = IngestJob(settings, embedder).run(corpus, follow_links=True)
    retriever = Retriever(Store.open(settings.index_dir, embedder.name), embedder)
    result = {"ingest s": report.total_seconds, "failed": len(report.failed)}
    for kind in RetrieverKind:
        rankings = [[(Path(hit.chunk.source).stem, hit.chunk.page)
                     for hit in retriever.retrieve(q["question"], DEPTH, kind, collection=DEFAULT_COLLECTION)]
                    for q in questions]
        result[kind.value] = score(rankings, questions)
    return result


def digital_parse(files: list[Path], rounds: int = 4) -> list[list[object]]:
    """Best parse seconds of the original (text-layer) PDFs with OCR off and auto, in `rounds` rounds whose order
    alternates (the second parse of a round ran 6-9% slower than the first, whichever it was)."""
    best = {"off": float("inf"), "auto": float("inf")}
    for round_ in range(rounds):
        for name, options in (("off", None), ("auto", OPTIONS))[::1 if round_ % 2 == 0 else -1]:
            started = time.perf_counter()
            for path in files:
                parse_pdf(path, ocr=options)
            best[name] = min(best[name], time.perf_counter() - started)
    return [[name, f"{seconds:.2f}", f"{seconds / best['off']:.3f}×"] for name, seconds in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None, help="folder with pdfs/ and questions.jsonl")
    parser.add_argument("--usgov", type=Path, default=None, help="folder of US agency PDFs (searched recursively)")
    parser.add_argument("--pages", type=int, default=20, help="FinanceBench evidence pages to scan (about)")
    parser.add_argument("--usgov-pages", type=int, default=4, help="US agency PDFs whose first text page is scanned")
    parser.add_argument("--dpi", type=int, action="append", default=None, help="scan resolutions (150, 200)")
    parser.add_argument("--corpus", choices=["gold", "all"], default="gold")
    args = parser.parse_args()
    dataset = args.dataset or shared_dataset("financebench-dev")
    usgov = args.usgov or shared_dataset("usgov-pdfs")
    if reason := unavailable(OPTIONS):
        sys.exit(reason)
    questions, scanned = choose(dataset, usgov, args.pages, args.usgov_pages)
    print(f"# OCR bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, CPU flags: {cpu_flags()}; {len(questions)} questions, "
          f"{sum(map(len, scanned.values()))} scanned pages of {len(scanned)} PDFs\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ocr-") as folder:
        workdir = Path(folder)
        rows, copies_200 = [], {}
        for dpi in args.dpi or [150, 200]:
            copies = {}
            for path, pages in scanned.items():
                copies[path] = workdir / f"{dpi}" / path.name
                copies[path].parent.mkdir(exist_ok=True)
                scan_copy(path, pages, dpi, copies[path])
            for name, subset in (("financebench", {p: n for p, n in scanned.items() if p.is_relative_to(dataset)}),
                                 ("usgov", {p: n for p, n in scanned.items() if p.is_relative_to(usgov)})):
                if subset:
                    result = ocr_run(subset, copies)
                    rows.append([name, dpi, result["pages"], f"{result['pages/s']:.2f}",
                                 f"{result['cpu s/page']:.2f}", f"{result['CER']:.4f}", result["worst"],
                                 f"{result['confidence']:.3f}"])
                    print(f"{name} at {dpi} dpi: {rows[-1][2:]}", file=sys.stderr, flush=True)
            copies_200 = copies if dpi == 200 else copies_200
        print("\n" + markdown_table(["pages of", "scan dpi", "pages", "pages/s (2 workers)", "CPU s/page", "CER",
                                     "worst page", "mean confidence"], rows) + "\n", flush=True)

        gold = [path for path in scanned if path.is_relative_to(dataset)]
        originals = sorted((dataset / "pdfs").glob("*.pdf")) if args.corpus == "all" else gold
        if copies_200:
            embedder = Embedder()
            embedder.encode(["warm up"] * embedder.batch_size)
            runs = {"original": retrieval(originals, questions, embedder, workdir, "original"),
                    "scanned 200 dpi": retrieval([copies_200.get(p, p) for p in originals], questions, embedder,
                                                 workdir, "scanned")}
            table = [[name, kind.value, f"{run[kind.value]['doc hit@1']:.3f}", f"{run[kind.value]['doc hit@5']:.3f}",
                      f"{run[kind.value]['page hit@5']:.3f}", f"{run['ingest s']:.1f}", run["failed"]]
                     for name, run in runs.items() for kind in RetrieverKind]
            print(markdown_table(["corpus", "retriever", "doc hit@1", "doc hit@5", "evidence-page hit@5",
                                  "ingest s", "files failed"], table) + "\n", flush=True)
        print(markdown_table(["digital PDFs, OCR", "parse s (best of 4)", "vs off"], digital_parse(originals)))


if __name__ == "__main__":
    main()
