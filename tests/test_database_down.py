"""A PostgreSQL store whose database cannot be reached: the CLI exits 3 and the API answers 503, each with a reason
that names the server but never its password, and no traceback; a replica becomes ready once the database is up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "never-shown-secret"


def unreachable_url() -> str:
    return f"postgresql://rag:{SECRET}@127.0.0.1:{free_port()}/rag"  # nothing listens there


def test_cli_exits_3_with_the_reason_and_no_password(tmp_path):
    url = unreachable_url()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAG_STORE_URL": url, "RAG_DB_TIMEOUT_S": "2"}
    for command in (["search", "timeouts"], ["documents", "list"], ["index", "stats"]):
        result = subprocess.run([sys.executable, "-m", "cli", *command], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode == 3, output
        assert "127.0.0.1" in output and SECRET not in output and "Traceback" not in output


def test_api_is_not_ready_while_the_database_is_away_and_ready_once_it_is_up(embedder, generator, postgres_server,
                                                                             new_postgres_database, tmp_path):
    import psycopg
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.config import ApiSettings
    from ingest.job import IngestJob
    from rag.config import Settings
    from rag.pipeline import Pipeline

    settings = Settings(index_dir=tmp_path / "unused", store_url=unreachable_url(), db_timeout_s=2)
    app = create_app(settings, Pipeline(settings, generator=generator),
                     api_settings=ApiSettings(index_poll_s=0.2), ingest_embedder=embedder)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").json()["reason"] == "Loading the models.":
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        ready = client.get("/readyz")
        # no stored key can be checked either: the reason, without the details an admin key would get
        assert ready.status_code == 503 and ready.json()["reason"] == "The index's database is not answering."
        search = client.post("/v1/search", json={"query": "timeouts"})
        assert search.status_code == 503
        for response in (ready, search):
            assert SECRET not in response.text and "Traceback" not in response.text

    # The same app shape against a database that answers (and holds an index) becomes ready.
    url = new_postgres_database("down_then_up")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "timeouts.md").write_text("# Timeouts\n\nHTTPX times out after five seconds by default.\n")
    IngestJob(Settings(store_url=url, parse_workers=1), embedder).run(docs)
    settings = Settings(index_dir=tmp_path / "unused", store_url=url)
    app = create_app(settings, Pipeline(settings, generator=generator),
                     api_settings=ApiSettings(index_poll_s=0.2), ingest_embedder=embedder)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        hits = client.post("/v1/search", json={"query": "default timeout"}).json()["results"]
        assert hits and hits[0]["source"].endswith("timeouts.md")

        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(postgres_server.get_uri(), autocommit=True) as admin:  # the database goes away
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        while client.get("/readyz").status_code != 503:  # noticed by the next refresh
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        search = client.post("/v1/search", json={"query": "default timeout"})
        assert search.status_code == 503 and "Traceback" not in search.text
        with psycopg.connect(postgres_server.get_uri(), autocommit=True) as admin:  # and comes back
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline + 120, client.get("/readyz").json()
            time.sleep(0.1)
        assert client.post("/v1/search", json={"query": "default timeout"}).status_code == 200
