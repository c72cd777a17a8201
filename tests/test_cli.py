"""The `rag` command as a user and a script see it: options documented, JSON output, exit codes."""

import json
import shutil

from typer.testing import CliRunner

from rag.cli import EXIT_FILES_FAILED, EXIT_INDEX_ERROR, EXIT_OK, app

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
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and hits[0]["source"].endswith("timeouts.md") and hits[0]["score"] > 0.3

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
    monkeypatch.setenv("RAG_PARSE_WORKERS", "1")
    result = runner.invoke(app, ["ingest", str(docs), "--index", str(tmp_path / "index"), "--json"])
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["files"]["skipped"] == 1 and report["files"]["failed"] == 0 and report["files"]["new"] == 1
    skipped = [r for r in report["results"] if r["status"] == "skipped"]
    assert skipped[0]["source"].endswith("LICENSE") and "unsupported file type" in skipped[0]["error"]
    result = runner.invoke(app, ["ingest", str(docs), "--index", str(tmp_path / "index")], env={"COLUMNS": "200"})
    assert result.exit_code == EXIT_OK and "Files skipped" in result.stdout and "LICENSE" in result.stdout


def test_missing_index_exits_with_index_error(tmp_path):
    result = runner.invoke(app, ["search", "anything", "--index", str(tmp_path / "none")])
    assert result.exit_code == EXIT_INDEX_ERROR
    assert "rag ingest" in result.output


def test_invalid_settings_are_usage_errors(docs_dir, tmp_path):
    result = runner.invoke(app, ["ingest", str(docs_dir), "--index", str(tmp_path / "i"), "--chunk-tokens", "50",
                                 "--chunk-overlap", "60"])
    assert result.exit_code == 2
    assert "chunk_overlap" in result.output
