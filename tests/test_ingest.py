"""The ingestion job: incremental, idempotent, safe against bad input, other models and network use."""

import logging
import shutil
import socket
from pathlib import Path

import pytest

from ingest.job import IngestJob
from rag.store import IndexMismatchError, IndexNotFoundError, Store
from rag.types import ALL_COLLECTIONS
from tests.conftest import CORPUS
from tests.pdfs import report_with_scanned_pages, scan_without_text


def _duplicates(store: Store) -> int:
    rows = store.db.execute(
        "SELECT COUNT(*) FROM (SELECT doc_id, hash, ordinal FROM chunks GROUP BY doc_id, ordinal HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    same_text = store.db.execute(
        "SELECT COUNT(*) FROM (SELECT doc_id, hash FROM chunks GROUP BY doc_id, hash, ordinal HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    return rows + same_text


def test_ingest_writes_a_complete_snapshot(docs_dir, settings, embedder):
    report = IngestJob(settings, embedder).run(docs_dir)
    assert report.status_counts["new"] == 6 and not report.failed
    store = Store.open(settings.index_dir, embedder.name, embedder.dimension)
    counts = store.counts(collection=ALL_COLLECTIONS)
    assert counts["documents"] == 6 and counts["chunks"] == counts["vectors"] > 20
    manifest = store.manifest
    assert manifest.embedding_model == embedder.name and manifest.dimension == 384
    assert manifest.chunking["chunk_tokens"] == settings.chunk_tokens and manifest.created_at
    pdf_chunks = [c for c in store.iter_chunks(collection=ALL_COLLECTIONS) if c.source.endswith("ntsb-report.pdf")]
    assert pdf_chunks and all(c.page for c in pdf_chunks)
    assert any(c.heading for c in store.iter_chunks(collection=ALL_COLLECTIONS) if c.source.endswith("quickstart.md"))
    assert (settings.index_dir / "store.sqlite").exists() and list((settings.index_dir / "segments").glob("*.faiss"))
    assert not list(settings.index_dir.rglob("*.pkl")) and not list(settings.index_dir.rglob("*.pickle"))


def test_three_runs_leave_identical_counts_and_no_duplicates(docs_dir, settings, embedder):
    job = IngestJob(settings, embedder)
    reports = [job.run(docs_dir) for _ in range(3)]
    assert reports[1].status_counts["unchanged"] == reports[2].status_counts["unchanged"] == 6
    assert reports[1].snapshot is None and reports[2].snapshot is None  # nothing changed, nothing rewritten
    store = Store.open(settings.index_dir)
    assert store.counts(collection=ALL_COLLECTIONS) == reports[0].index_counts
    assert _duplicates(store) == 0


def test_a_run_that_finds_nothing_changed_loads_no_model(docs_dir, settings, embedder):
    """Deciding that nothing changed needs the embedder's name and the index's recorded weights, not torch."""
    import subprocess
    import sys

    IngestJob(settings, embedder).run(docs_dir)
    script = ("import sys; from pathlib import Path; from rag.config import Settings; from ingest.job import IngestJob; "
              f"report = IngestJob(Settings(index_dir={str(settings.index_dir)!r})).run(Path({str(docs_dir)!r})); "
              "assert report.status_counts['unchanged'] == 6, report.status_counts; "
              "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_touched_but_identical_file_is_not_reparsed(docs_dir, settings, embedder):
    job = IngestJob(settings, embedder)
    job.run(docs_dir)
    note = docs_dir / "notes.txt"
    note.write_text(note.read_text())  # new mtime, same bytes
    report = job.run(docs_dir)
    assert report.status_counts["unchanged"] == 6 and report.chunks_added == 0


def test_changed_file_replaces_its_chunks_and_deleted_file_is_pruned(docs_dir, settings, embedder):
    job = IngestJob(settings, embedder)
    before = job.run(docs_dir).index_counts
    (docs_dir / "notes.txt").write_text("The release train now leaves every Friday at noon.\n")
    (docs_dir / "blog.html").unlink()
    report = job.run(docs_dir)
    assert report.status_counts == {"new": 0, "changed": 1, "unchanged": 4, "duplicate": 0, "removed": 1, "skipped": 0,
                                    "failed": 0}
    store = Store.open(settings.index_dir)
    texts = [c.text for c in store.iter_chunks(collection=ALL_COLLECTIONS) if c.source.endswith("notes.txt")]
    assert texts == ["The release train now leaves every Friday at noon."]
    assert not [c for c in store.iter_chunks(collection=ALL_COLLECTIONS) if c.source.endswith("blog.html")]
    assert store.counts(collection=ALL_COLLECTIONS)["documents"] == before["documents"] - 1
    assert store.counts(collection=ALL_COLLECTIONS)["chunks"] == store.counts(collection=ALL_COLLECTIONS)["vectors"]
    hit, _ = store.search(embedder.encode_query("when does the release train leave?"), 1, collection=ALL_COLLECTIONS)[0]
    assert "Friday" in hit.text


def test_no_prune_keeps_documents_of_deleted_files(docs_dir, settings, embedder):
    job = IngestJob(settings, embedder)
    job.run(docs_dir)
    (docs_dir / "notes.txt").unlink()
    report = job.run(docs_dir, prune=False)
    assert report.status_counts["removed"] == 0
    assert Store.open(settings.index_dir).counts(collection=ALL_COLLECTIONS)["documents"] == 6


def test_a_copy_of_a_file_is_reported_as_its_duplicate_unless_asked_to_keep_both(docs_dir, settings, embedder):
    (docs_dir / "copies").mkdir()
    shutil.copy(docs_dir / "timeouts.md", docs_dir / "copies" / "timeouts-again.md")
    report = IngestJob(settings, embedder).run(docs_dir)
    (duplicate,) = [result for result in report.files if result.status == "duplicate"]
    names = {record.name: record for record in Store.open(settings.index_dir).documents(collection="default").values()}
    copies = {"timeouts.md", "copies/timeouts-again.md"}
    (indexed,) = copies & set(names)  # the first one found; the other is its duplicate
    assert duplicate.source.endswith((copies - {indexed}).pop()) and duplicate.chunks == 0
    assert duplicate.duplicate_of == names[indexed].doc_id and f"'{indexed}'" in duplicate.error
    assert report.status_counts["duplicate"] == 1 and not report.failed

    kept = IngestJob(settings.with_overrides(keep_duplicates=True), embedder).run(docs_dir)
    assert [result.status for result in kept.files if result.source == duplicate.source] == ["new"]
    assert copies <= {record.name for record in Store.open(settings.index_dir).documents(collection="default").values()}


def test_include_and_exclude_globs(docs_dir, settings, embedder):
    report = IngestJob(settings, embedder).run(docs_dir, include=["*.md", "*.txt"], exclude=["time*"])
    assert sorted(Path(r.source).name for r in report.files) == ["notes.txt", "quickstart.md"]


def test_bad_inputs_are_reported_and_everything_else_ingests(docs_dir, settings, embedder):
    (docs_dir / "broken.pdf").write_bytes(b"%PDF-1.7\n%garbage that is not a pdf body")
    (docs_dir / "scan.pdf").write_bytes(scan_without_text())
    (docs_dir / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" * 50)
    (docs_dir / "empty.md").write_bytes(b"")
    (docs_dir / "table.numbers").write_bytes(b"unsupported")
    (docs_dir / "mojibake.txt").write_bytes(bytes(range(128, 256)) * 30)
    report = IngestJob(settings, embedder).run(docs_dir)
    reasons = {Path(r.source).name: r.error for r in report.failed}
    assert set(reasons) == {"broken.pdf", "scan.pdf", "image.txt", "empty.md", "mojibake.txt"}
    assert "corrupt PDF" in reasons["broken.pdf"] and "binary" in reasons["image.txt"]
    assert "no text layer" in reasons["scan.pdf"] and "empty" in reasons["empty.md"]
    # A file of an unsupported type is listed as skipped, with the reason, and is not a failure.
    assert [(Path(r.source).name, "unsupported file type" in r.error) for r in report.skipped] == [("table.numbers", True)]
    assert report.status_counts["new"] == 6 and report.status_counts["skipped"] == 1
    assert Store.open(settings.index_dir).counts(collection=ALL_COLLECTIONS)["documents"] == 6


def test_what_an_ingested_file_could_not_give_the_index_is_reported_with_it(tmp_path, settings, embedder, caplog):
    folder = tmp_path / "signed"
    folder.mkdir()
    (folder / "signed.pdf").write_bytes(report_with_scanned_pages())  # pages 2 and 4 are scanned signatures
    shutil.copy(CORPUS / "httpx" / "quickstart.md", folder / "quickstart.md")
    settings = settings.with_overrides(parse_workers=2)  # the warnings come back from the worker processes
    report = IngestJob(settings, embedder).run(folder)
    assert not report.failed and report.status_counts["new"] == 2
    [signed] = report.warned
    assert Path(signed.source).name == "signed.pdf" and signed.chunks > 0
    assert signed.warnings[0].startswith("2 of 4 pages are page-sized images") and signed.warnings[0].endswith("page 2, 4")
    assert report.to_dict()["files"]["with_warnings"] == 1
    assert f"{signed.source}: 2 of 4 pages" in caplog.text  # logged by the writer, naming the file
    # kept with the document, so a reader can tell later runs' unchanged documents are incomplete too
    again = IngestJob(settings, embedder).run(folder)
    assert again.status_counts["unchanged"] == 2 and not again.warned
    store = Store.open(settings.index_dir)
    assert {Path(r.source).name: r.warnings for r in store.documents(collection=ALL_COLLECTIONS).values()} == {
        "signed.pdf": signed.warnings, "quickstart.md": ()}
    store.close()


def test_documents_built_by_an_older_chunker_are_rechunked_without_duplicates(docs_dir, settings, embedder,
                                                                            monkeypatch, caplog):
    import ingest.job

    monkeypatch.setattr(ingest.job, "CHUNKER_VERSION", "an-older-parser")
    IngestJob(settings, embedder).run(docs_dir)
    monkeypatch.undo()
    report = IngestJob(settings, embedder).run(docs_dir)
    assert report.stale == 6 and report.status_counts["changed"] == 6
    assert "6 documents were built by an older parser" in caplog.text
    store = Store.open(settings.index_dir)
    assert store.counts(collection=ALL_COLLECTIONS)["documents"] == 6 and _duplicates(store) == 0
    assert store.counts(collection=ALL_COLLECTIONS)["chunks"] == report.chunks_added  # the old chunks are gone, only the new ones remain
    assert IngestJob(settings, embedder).run(docs_dir).stale == 0  # and the next run finds nothing stale


def test_a_file_that_turns_corrupt_keeps_its_previous_version(docs_dir, settings, embedder):
    job = IngestJob(settings, embedder)
    job.run(docs_dir)
    (docs_dir / "ntsb-report.pdf").write_bytes(b"%PDF-1.4 truncated")
    report = job.run(docs_dir)
    assert "previous version kept" in report.failed[0].error
    assert any(c.source.endswith("ntsb-report.pdf") for c in Store.open(settings.index_dir).iter_chunks(collection=ALL_COLLECTIONS))


def test_index_built_with_another_model_is_a_clear_error(docs_dir, settings, embedder):
    IngestJob(settings, embedder).run(docs_dir)
    with pytest.raises(IndexMismatchError, match="all-MiniLM-L6-v2.*other-model"):
        Store.open(settings.index_dir, "other-model", 768)
    with pytest.raises(IndexMismatchError, match="768 dims"):
        Store.begin(settings.index_dir, embedder.name, 768, {})


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="rag ingest"):
        Store.open(tmp_path / "nowhere")


def test_ingestion_uses_no_network(docs_dir, settings, embedder, monkeypatch):
    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("::1", "localhost") or host.startswith("/")):
            attempts.append(address)
            raise OSError(f"network access attempted during ingestion: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: guarded_connect(None, address))
    report = IngestJob(settings, embedder).run(docs_dir)  # this process's part: the parse workers are others
    assert not report.failed and attempts == []


def test_parallel_parsing_gives_the_same_index(docs_dir, settings, embedder, tmp_path):
    serial = IngestJob(settings, embedder).run(docs_dir).index_counts
    parallel_settings = settings.with_overrides(index_dir=tmp_path / "parallel", parse_workers=2)
    parallel = IngestJob(parallel_settings, embedder).run(docs_dir).index_counts
    assert parallel == serial
    texts = lambda index: sorted(c.text for c in Store.open(index).iter_chunks(collection=ALL_COLLECTIONS))  # noqa: E731
    assert texts(settings.index_dir) == texts(parallel_settings.index_dir)


def test_a_long_pdfs_pages_read_across_workers_give_the_same_chunks(tmp_path, settings, embedder, monkeypatch):
    from ingest import job
    from tests.pdfs import long_report

    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "annual.pdf").write_bytes(long_report(pages=2 * job.PAGES_PER_TASK + 5))
    serial = IngestJob(settings, embedder).run(folder)  # one worker: the PDF whole, in it
    split = []
    parse_file = job.parse_file
    monkeypatch.setattr(job, "parse_file", lambda *args, **kwargs: split.append(kwargs) or parse_file(*args, **kwargs))
    parallel_settings = settings.with_overrides(index_dir=tmp_path / "parallel", parse_workers=2)
    parallel = IngestJob(parallel_settings, embedder).run(folder)
    assert [kwargs.get("pages_per_task") for kwargs in split] == [job.PAGES_PER_TASK]  # 3 ranges in 2 workers
    assert not serial.failed and parallel.index_counts == serial.index_counts
    chunks = lambda index: sorted((c.ordinal, c.page, c.heading, c.text) for c in Store.open(index).iter_chunks(collection=ALL_COLLECTIONS))  # noqa: E731
    assert chunks(parallel_settings.index_dir) == chunks(settings.index_dir)
    headings = {page: heading for _, page, heading, _ in chunks(settings.index_dir)}
    assert headings[2 * job.PAGES_PER_TASK + 5] == f"Segment {2 * job.PAGES_PER_TASK + 4} results"  # in the last range
    assert not [text for *_, text in chunks(settings.index_dir) if "Annual Report 2024" in text]  # furniture: all pages


def test_parse_results_come_in_order_with_a_bounded_number_ahead():
    from concurrent.futures import ThreadPoolExecutor

    from ingest.job import in_order

    outstanding, most = 0, 0

    def submit(item):
        nonlocal outstanding, most
        outstanding += 1
        most = max(most, outstanding)
        return pool.submit(lambda: item * item)

    with ThreadPoolExecutor(2) as pool:
        results = []
        for result in in_order(submit, range(50), ahead=4):
            outstanding -= 1
            results.append(result)
    assert results == [item * item for item in range(50)]
    assert most == 4 + 1  # the one in hand: thousands of files do not all wait parsed in memory for the embedder


def test_store_failure_before_the_switch_leaves_the_previous_snapshot(docs_dir, settings, embedder, monkeypatch):
    job = IngestJob(settings, embedder)
    before = job.run(docs_dir).index_counts
    shutil.copy(CORPUS / "httpx" / "api.md", docs_dir / "api.md")
    import rag.store.segments

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rag.store.segments.os, "replace", crash)  # the new vector segment cannot be put in place
    with pytest.raises(OSError, match="disk full"):
        job.run(docs_dir)
    monkeypatch.undo()
    assert Store.open(settings.index_dir).counts(collection=ALL_COLLECTIONS) == before
    assert job.run(docs_dir).status_counts["new"] == 1  # the next run completes the work


def test_onnx_embeddings_match_fp32(tmp_path, monkeypatch, caplog):
    import onnx as onnx_format

    from rag import embed_onnx
    from rag.embed import Embedder

    texts = ["How do I set a timeout?", "Net sales rose 14% to $1,250 million in the quarter ended March 31, 2024."]
    reference = Embedder(device="cpu", precision="fp32").encode(texts)
    onnx = Embedder(device="cpu", precision="onnx", cache_dir=tmp_path)
    assert (onnx.encode(texts) * reference).sum(axis=1).min() > 0.9999  # the same graph, other kernels; padded
    exported = {node.op_type for node in onnx_format.load(str(onnx.onnx.graph)).graph.node}
    assert "Softmax" in exported and "IsNaN" not in exported  # the export's NaN guards are gone (embed_onnx.py)
    for flags, graph in [({"avx2", "avx512_vnni"}, "model.int8.onnx"), ({"avx2"}, "model.int8-w7.onnx"),
                         (set(), "model.int8.onnx")]:  # VNNI, AVX2 only (saturating), not x86
        monkeypatch.setattr(embed_onnx, "cpu_flags", lambda: frozenset(flags))
        int8 = Embedder(device="cpu", precision="onnx-int8", cache_dir=tmp_path)
        assert int8.onnx.graph.name == graph
        assert (int8.encode(texts) * reference).sum(axis=1).min() > 0.97  # int8 weights: close, not equal
    cached = ["model.int8-w7.onnx", "model.int8.onnx", "model.onnx"]
    assert sorted(path.name for path in tmp_path.rglob("*.onnx")) == cached
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]  # quantised quietly


def test_queries_embed_on_onnx_fp32_without_importing_sentence_transformers(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from rag.embed import Embedder

    texts = ["How do I set a timeout?", "Net sales rose 14% to $1,250 million in the quarter ended March 31, 2024."]
    assert Embedder(device="cpu", precision="fp32").query_precision == "fp32"  # an explicit choice is kept
    script = ("import sys, numpy; from rag.embed import Embedder; "
              f"e = Embedder(device='cpu', precision='onnx', cache_dir={str(tmp_path)!r}); "
              f"v = e.encode_queries({texts!r}); "
              "assert 'sentence_transformers' not in sys.modules, 'imported'; numpy.save(sys.argv[1], v)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "v.npy")], check=True, timeout=600,
                   cwd=Path(__file__).resolve().parents[1])
    reference = Embedder(device="cpu", precision="fp32").encode(texts)
    assert (np.load(tmp_path / "v.npy") * reference).sum(axis=1).min() > 0.9999


def test_auto_embeds_queries_in_the_graph_that_embeds_passages(monkeypatch):
    from rag import embed

    # bf16 where AMX runs it (the fastest path there); int8 on other CPUs, those with AVX512-BF16 alone included
    for native_bf16, amx, passages, queries in ((True, True, "bf16", "onnx"), (True, False, "onnx-int8", "onnx-int8"),
                                                (False, False, "onnx-int8", "onnx-int8")):
        monkeypatch.setattr(embed, "resolve_precision", lambda precision, device: "bf16" if native_bf16 else "fp32")
        monkeypatch.setattr(embed, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"} if amx else {"avx2"}))
        embedder = embed.Embedder(device="cpu")
        assert (embedder.precision, embedder.query_precision) == (passages, queries)
        # An index's recorded weights decide over this CPU's choice, for passages and queries alike.
        embedder.follow("int8")
        assert (embedder.precision, embedder.query_precision, embedder.weights) == ("onnx-int8", "onnx-int8", "int8")
        embedder.follow("fp32")  # in bf16 wherever the CPU has it: the same vectors as fp32 to cosine 0.99997
        fp32 = "bf16" if native_bf16 else "fp32"
        assert (embedder.precision, embedder.query_precision, embedder.weights) == (fp32, "onnx", "fp32")
        embedder.follow(None)  # a new index: this CPU's own choice again
        assert (embedder.precision, embedder.query_precision) == (passages, queries)


def test_writers_and_readers_follow_the_weights_the_index_was_embedded_with(docs_dir, settings, tmp_path, caplog):
    """Machines whose `auto` differs (a CPU without bf16 embeds in int8, one with it or a GPU in fp32) write and
    query one index alike; an explicit other precision re-embeds what it ingests, with a warning."""
    from rag.embed import Embedder
    from rag.retrieve import Retriever

    def embedder(precision: str = "auto") -> Embedder:
        return Embedder(device="cpu", precision=precision, cache_dir=tmp_path / "graphs")

    IngestJob(settings, embedder("onnx-int8")).run(docs_dir)  # as `auto` does on a CPU without bf16
    assert Store.open(settings.index_dir).manifest.chunking["embedding_weights"] == "int8"
    writer = embedder()
    report = IngestJob(settings, writer).run(docs_dir)
    assert report.status_counts["unchanged"] == 6 and report.stale == 0 and writer.weights == "int8"
    reader = Retriever(Store.open(settings.index_dir), embedder()).embedder
    assert (reader.precision, reader.query_precision) == ("onnx-int8", "onnx-int8")

    report = IngestJob(settings, embedder("onnx")).run(docs_dir)
    assert report.stale == 6 and report.status_counts["changed"] == 6
    assert "computed with int8 weights, RAG_EMBEDDING_PRECISION=onnx computes fp32" in caplog.text
    store = Store.open(settings.index_dir)
    assert store.manifest.chunking["embedding_weights"] == "fp32" and _duplicates(store) == 0
    follower = Retriever(store, embedder()).embedder
    assert follower.precision in ("bf16", "fp32") and follower.query_precision == "onnx"
    assert IngestJob(settings, follower).run(docs_dir).status_counts["unchanged"] == 6


def test_bf16_embeddings_match_fp32():
    from rag.embed import Embedder

    texts = ["How do I set a timeout?", "The default behavior is to raise a TimeoutException after 5 seconds."]
    full, half = Embedder(device="cpu", precision="fp32"), Embedder(device="cpu", precision="bf16")
    assert (full.precision, half.precision) == ("fp32", "bf16")
    cosines = (full.encode(texts) * half.encode(texts)).sum(axis=1)
    assert cosines.min() > 0.999  # bf16 matmuls, fp32 weights: the same ranking, not the same bits
    assert Embedder(device="cpu").precision in ("bf16", "onnx-int8")  # the fastest path this CPU has
    with pytest.raises(ValueError, match="Unknown precision"):
        Embedder(device="cpu", precision="int4")
