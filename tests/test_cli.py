"""The `rag` command as a user and a script see it: options documented, JSON output, exit codes."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.schemas import AnswerOut, SearchHit
from cli import EXIT_FILES_FAILED, EXIT_INDEX_ERROR, EXIT_OK, EXIT_USAGE, app

runner = CliRunner()


def test_ingest_help_documents_every_option():
    result = runner.invoke(app, ["ingest", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--index", "--include", "--exclude", "--prune", "--chunk-tokens", "--chunk-overlap", "--workers",
                   "--batch-size", "--embedding-model", "--json", "RAG_CHUNK_TOKENS", "Exit code"):
        assert option in result.output


def test_ingest_search_info_round_trip_with_json(docs_dir, tmp_path, monkeypatch):
    index = tmp_path / "index"
    monkeypatch.setenv("RAG_PARSE_WORKERS", "1")
    (docs_dir / "broken.pdf").write_bytes(b"not a pdf")
    result = runner.invoke(app, ["ingest", str(docs_dir), "--index", str(index), "--json"])
    assert result.exit_code == EXIT_FILES_FAILED, result.output
    report = json.loads(result.stdout)
    assert report["files"]["new"] == 6 and report["files"]["failed"] == 1
    assert report["index"]["chunks"] == report["chunks_added"] > 0

    result = runner.invoke(app, ["search", "how do I set a timeout on a client", "-k", "3", "--index", str(index), "--json"])
    assert result.exit_code == EXIT_OK
    hits = json.loads(result.stdout)  # hybrid by default, as /v1/search: both retrievers' scores are shown
    assert len(hits) == 3 and hits[0]["source"].endswith("timeouts.md") and hits[0]["scores"]["dense"] > 0.3
    assert set(hits[0]) == set(SearchHit.model_fields)
    result = runner.invoke(app, ["search", "timeout", "--retriever", "bm25", "--source", "*.md", "--index", str(index),
                                 "--json"])
    assert result.exit_code == EXIT_OK
    hits = json.loads(result.stdout)
    assert hits and all(hit["source"].endswith(".md") and set(hit["scores"]) == {"bm25"} for hit in hits)

    monkeypatch.setenv("RAG_INDEX_DIR", str(index))  # settings come from the environment too
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == EXIT_OK
    info = json.loads(result.stdout)
    assert info["counts"]["documents"] == 6 and info["embedding_model"].endswith("all-MiniLM-L6-v2")

    (docs_dir / "broken.pdf").unlink()
    result = runner.invoke(app, ["ingest", str(docs_dir), "--index", str(index)])
    assert result.exit_code == EXIT_OK and "Nothing changed" in result.stdout


def test_unsupported_files_are_skipped_and_do_not_fail_the_run(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text("# Notes\n\nThe release train leaves every second Tuesday.\n")
    (docs / "LICENSE").write_text("Permission is hereby granted, free of charge, ...\n")
    (docs / "legacy.txt").write_bytes("Déjà vu: the café's façade was repainted in the naïve style.\n".encode("cp1252"))
    monkeypatch.setenv("RAG_PARSE_WORKERS", "1")
    result = runner.invoke(app, ["ingest", str(docs), "--index", str(tmp_path / "index"), "--json"])
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["files"]["skipped"] == 1 and report["files"]["failed"] == 0 and report["files"]["new"] == 2
    skipped = [r for r in report["results"] if r["status"] == "skipped"]
    assert skipped[0]["source"].endswith("LICENSE") and "unsupported file type" in skipped[0]["error"]
    # an ingested file read by a guessed encoding is not a failure either, but the run says so
    assert report["files"]["with_warnings"] == 1
    [legacy] = [r for r in report["results"] if r["source"].endswith("legacy.txt")]
    assert legacy["status"] == "new" and legacy["warnings"][0].startswith("not UTF-8: read as ")
    listing = runner.invoke(app, ["documents", "list", "--index", str(tmp_path / "index"), "--json"])
    assert {Path(d["source"]).name: d["warnings"] for d in json.loads(listing.stdout)["documents"]} == {
        "notes.md": [], "legacy.txt": legacy["warnings"]}
    result = runner.invoke(app, ["ingest", str(docs), "--index", str(tmp_path / "other")], env={"COLUMNS": "200"})
    assert result.exit_code == EXIT_OK and "Files skipped" in result.stdout and "LICENSE" in result.stdout
    assert "Files ingested with warnings" in result.stdout and "not UTF-8: read as" in result.stdout


def test_missing_index_exits_with_index_error(tmp_path):
    result = runner.invoke(app, ["search", "anything", "--index", str(tmp_path / "none")])
    assert result.exit_code == EXIT_INDEX_ERROR
    assert "rag ingest" in result.output


def test_invalid_settings_are_usage_errors(docs_dir, tmp_path):
    result = runner.invoke(app, ["ingest", str(docs_dir), "--index", str(tmp_path / "i"), "--chunk-tokens", "50",
                                 "--chunk-overlap", "60"])
    assert result.exit_code == 2
    assert "chunk_overlap" in result.output


@pytest.mark.slow
def test_ask_json_is_the_api_answer_body(tmp_path, monkeypatch, decoder_cache):
    monkeypatch.setenv("RAG_CACHE_DIR", str(decoder_cache))
    result = runner.invoke(app, ["ask", "What is the capital of France?", "--path", "prompt", "--max-new-tokens",
                                 "4", "--index", str(tmp_path / "none"), "--json"])
    assert result.exit_code == EXIT_OK, result.output
    answer = json.loads(result.stdout)
    assert set(answer) == set(AnswerOut.model_fields)
    assert answer["path"] == "prompt" and answer["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] <= 4


def test_ask_errors_have_their_exit_codes(tmp_path, monkeypatch):
    # No decoder at all: the index error must come first (and the background decoder preload ends at once).
    monkeypatch.setenv("RAG_DECODER_MODEL", str(tmp_path / "no-decoder.gguf"))
    missing_index = runner.invoke(app, ["ask", "anything", "--index", str(tmp_path / "none")])
    assert missing_index.exit_code == EXIT_INDEX_ERROR and "rag ingest" in missing_index.output
    no_adapter = runner.invoke(app, ["ask", "anything", "--path", "finetuned"])
    assert no_adapter.exit_code == EXIT_USAGE and "Available paths: prompt, rag" in no_adapter.output
    bad_path = runner.invoke(app, ["ask", "anything", "--path", "magic"])
    assert bad_path.exit_code == EXIT_USAGE
