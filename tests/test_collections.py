"""Collections and scoped API keys: nothing of one collection ever reaches a key of another.

Two collections with distinct documents (alpha, bravo), keys of each kind (a read key of alpha, a write key of
bravo, an admin key of alpha, an admin key of every collection, an environment key), and every /v1 route tried
with a key of the other collection: the test enumerates the app's routes, so a new route without a case fails.
Every response body is searched for the other collection's file names, document ids, chunk ids, job id, key id,
report name and words of its text. The store is a fixture parameter (`STORES`) so the same suite runs against
every store backend. One file (over 400 lines) because the route cases share one module-scoped world: one app, one
set of keys and documents, one model load.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_api import sse_events, wait_ready

STORES = ["embedded", "postgres"]
ENV_KEY = "environment-admin-key"
ALPHA, BRAVO = "alpha", "bravo"
# Each collection's documents speak of things the other's never mention, so a leak of text shows as a word.
DOCUMENTS = {
    ALPHA: {"alpha-zephyr-valves.md": "# Zephyr valves\n\nThe zephyr valve opens at dawn and closes when the "
                                      "heron pump reports a pressure of eleven bar.\n",
            "alpha-heron-pumps.md": "# Heron pumps\n\nA heron pump is serviced every ninth week; its filter is "
                                    "rinsed in cold water.\n"},
    BRAVO: {"bravo-kestrel-codes.md": "# Kestrel codes\n\nThe kestrel launch code is marmalade, rotated each "
                                      "quarter by the quartermaster.\n",
            "bravo-osprey-budget.md": "# Osprey budget\n\nThe osprey programme budget is forty million, approved "
                                      "by the treasurer in March.\n"},
}
SECRET_WORDS = {ALPHA: ("zephyr", "heron"), BRAVO: ("kestrel", "marmalade", "osprey", "quartermaster")}
KEY_COLLECTIONS = {"alpha-read": ALPHA, "bravo-write": BRAVO, "alpha-admin": ALPHA}
OTHER = {ALPHA: BRAVO, BRAVO: ALPHA}
UPLOADED = "bravo-pelican-notes.md"  # uploaded through the API by bravo's write key
UPLOADED_TEXT = b"# Pelican notes\n\nThe pelican ledger is kept in the vault below the quartermaster's office.\n"
ASK = {"max_new_tokens": 4}


@dataclass
class World:
    """The app, its keys and everything that belongs to each collection (what must never leak)."""

    client: object
    settings: object
    keys: dict[str, str] = field(default_factory=dict)  # label -> secret
    key_ids: dict[str, str] = field(default_factory=dict)
    doc_ids: dict[str, list[str]] = field(default_factory=dict)
    chunk_ids: dict[str, list[int]] = field(default_factory=dict)
    job_ids: dict[str, str] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)

    def markers(self, collection: str) -> set[str]:
        """Strings that only something of `collection` can produce."""
        names = set(DOCUMENTS[collection]) | ({UPLOADED} if collection == BRAVO else set())
        return (names | set(SECRET_WORDS[collection]) | set(self.doc_ids[collection])
                | {self.job_ids[collection], self.reports[collection]}
                | {key_id for role, key_id in self.key_ids.items() if role.startswith(collection)})

    def call(self, key: str, method: str, url: str, **kwargs):
        """A request with the key labelled `key`; the response's `victim` is the collection that key is not of."""
        response = self.client.request(method, url, headers={"Authorization": f"Bearer {self.keys[key]}"}, **kwargs)
        response.victim = OTHER.get(KEY_COLLECTIONS.get(key))
        return response


def assert_no_trace(response, world: World, collection: str) -> None:
    """Nothing of `collection` in the response, except what the request itself said (a query's words, an id)."""
    text = response.text.lower()
    asked = f"{response.request.url} {response.request.content.decode(errors='replace')}".lower()
    chunk_fields = [f'"chunk_id":{chunk_id}' for chunk_id in world.chunk_ids[collection]]
    compact = text.replace(" ", "")
    leaked = [marker for marker in world.markers(collection)
              if marker.lower() in text and marker.lower() not in asked]
    leaked += [marker for marker in chunk_fields if marker in compact]
    assert not leaked, (response.request.method, response.request.url, leaked, response.text[:500])


def error_code(response) -> str:
    return response.json()["error"]["code"]


# ---------------------------------------------------------------------------------------------- the world
@pytest.fixture(scope="module", params=STORES)
def store_options(request) -> dict:
    """The settings that select the store under test: none for the embedded store (the default); the URL of a fresh
    database on the session's real PostgreSQL server for the postgres store."""
    if request.param == "postgres":
        return {"store_url": request.getfixturevalue("new_postgres_database")("collections")}
    return {}


@pytest.fixture(scope="module")
def world(store_options, embedder, generator, tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.config import ApiSettings
    from ingest.job import IngestJob
    from rag.config import Settings
    from rag.pipeline import Pipeline
    from rag.retrieve import Retriever
    from rag.store import open_key_store, open_store

    root = tmp_path_factory.mktemp("collections")
    settings = Settings(index_dir=root / "index", results_dir=root / "results", parse_workers=1, **store_options)
    for collection, files in DOCUMENTS.items():
        folder = root / collection
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        IngestJob(settings.with_overrides(collection=collection), embedder).run(folder)
    for collection in (ALPHA, BRAVO):  # one evaluation report each, recorded with its collection
        report = root / "results" / f"{collection}-eval"
        report.mkdir(parents=True)
        (report / "report.md").write_text(f"# Evaluation of {collection}-eval\n")
        (report / "results.json").write_text(json.dumps({"config": {"collection": collection}, "summary": {}}))

    key_store = open_key_store(settings)
    world_keys, key_ids = {}, {}
    for label, collection, role in (("alpha-read", ALPHA, "read"), ("bravo-write", BRAVO, "write"),
                                    ("alpha-admin", ALPHA, "admin"), ("all-admin", "*", "admin")):
        record, secret = key_store.create(label, collection, role)
        world_keys[label], key_ids[label] = secret, record.id
    key_store.close()
    world_keys["env"] = ENV_KEY

    pipeline = Pipeline(settings, retriever=Retriever(open_store(settings), embedder), generator=generator)
    app = create_app(settings, pipeline, ingest_embedder=embedder,
                     api_settings=ApiSettings(api_keys=ENV_KEY, index_poll_s=0, key_cache_s=0))
    with TestClient(app) as client:
        wait_ready(client)
        world = World(client, settings, world_keys, key_ids)
        accepted = world.call("bravo-write", "POST", "/v1/documents",
                              files=[("files", (UPLOADED, UPLOADED_TEXT, "text/markdown"))])
        assert accepted.status_code == 202 and accepted.json()["collection"] == BRAVO, accepted.text
        world.job_ids[BRAVO] = accepted.json()["job_id"]
        if settings.store_url:  # API replicas only record jobs in the database's queue: a worker runs them
            from ingest.worker import Worker

            Worker(settings, embedder).run(drain=True)
        deadline = time.monotonic() + 120
        while (job := world.call("bravo-write", "GET", accepted.json()["status_url"]).json())["status"] not in (
                "succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "succeeded" and job["collection"] == BRAVO, job
        world.job_ids[ALPHA] = "0" * 32  # alpha has no job: its marker is one no response contains
        reader = open_store(settings)  # what each collection holds, from the store itself, not the routes on trial
        for collection in (ALPHA, BRAVO):
            world.doc_ids[collection] = list(reader.documents(collection=collection))
            world.chunk_ids[collection] = [chunk.id for chunk in reader.iter_chunks(collection=collection)]
            world.reports[collection] = f"{collection}-eval"
        reader.close()
        assert len(world.doc_ids[ALPHA]) == 2 and len(world.doc_ids[BRAVO]) == 3 and all(world.chunk_ids.values())
        yield world


# ---------------------------------------------------------------------------------------------- every route
def _search(world):
    hits = world.call("alpha-read", "POST", "/v1/search", json={"query": "kestrel launch code marmalade", "k": 10})
    assert hits.status_code == 200 and hits.json()["collection"] == ALPHA
    assert {hit["doc_id"] for hit in hits.json()["results"]} <= set(world.doc_ids[ALPHA])
    yield hits
    yield world.call("alpha-read", "POST", "/v1/search", json={"query": "kestrel", "collection": BRAVO})


def _ask(world):
    for stream in (False, True):
        answer = world.call("alpha-read", "POST", "/v1/ask", json={"question": "What is the kestrel launch code?",
                                                                   "path": "rag", "k": 3, "stream": stream, **ASK})
        assert answer.status_code == 200
        body = json.loads(sse_events(answer.text)[-1][1]) if stream else answer.json()
        assert {source["chunk_id"] for source in body["sources"] + body["see_also"]} <= set(world.chunk_ids[ALPHA])
        yield answer
    yield world.call("alpha-read", "POST", "/v1/ask", json={"question": "kestrel?", "collection": BRAVO, **ASK})


def _chat(world):
    question = {"model": "rag", "max_tokens": 4,
                "messages": [{"role": "user", "content": "What is the kestrel code?"}]}
    for stream in (False, True):
        reply = world.call("alpha-read", "POST", "/v1/chat/completions", json={**question, "stream": stream})
        assert reply.status_code == 200
        yield reply
    yield world.call("alpha-read", "POST", "/v1/chat/completions", json={**question, "collection": BRAVO})


def _models(world):
    yield world.call("alpha-read", "GET", "/v1/models")


def _upload(world):
    files = [("files", ("alpha-note.md", b"# Note\n\nA note.\n", "text/markdown"))]
    refused = world.call("alpha-read", "POST", "/v1/documents", files=files)  # a read key uploads nothing
    assert refused.status_code == 403 and error_code(refused) == "role_forbidden"
    yield refused
    refused = world.call("bravo-write", "POST", "/v1/documents", files=files, data={"collection": ALPHA})
    assert refused.status_code == 403 and error_code(refused) == "collection_forbidden"
    yield refused


def _job(world):
    job_id = world.job_ids[BRAVO]
    hidden = world.call("alpha-read", "GET", f"/v1/jobs/{job_id}")
    unknown = world.call("alpha-read", "GET", f"/v1/jobs/{'f' * 32}")
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["message"].replace(job_id, "ID") == unknown.json()["error"]["message"].replace(
        "f" * 32, "ID")  # exactly like an unknown id
    yield hidden
    yield world.call("alpha-read", "GET", f"/v1/jobs/{job_id}", params={"collection": BRAVO})


def _list_documents(world):
    listed = world.call("alpha-read", "GET", "/v1/documents")
    body = listed.json()
    assert [d["collection"] for d in body["documents"]] == [ALPHA, ALPHA]
    assert body["counts"]["documents"] == 2  # counted: only alpha's
    assert body["counts"]["chunks"] == sum(d["chunk_count"] for d in body["documents"])
    yield listed
    yield world.call("alpha-read", "GET", "/v1/documents", params={"collection": BRAVO})


def _delete_document(world):
    doc_id = world.doc_ids[ALPHA][0]
    refused = world.call("bravo-write", "DELETE", f"/v1/documents/{doc_id}")  # alpha's document, bravo's key
    assert refused.status_code == 404 and error_code(refused) == "document_not_found"
    yield refused
    refused = world.call("alpha-read", "DELETE", f"/v1/documents/{doc_id}")  # a read key deletes nothing
    assert refused.status_code == 403 and error_code(refused) == "role_forbidden"
    yield refused
    yield world.call("bravo-write", "DELETE", f"/v1/documents/{doc_id}", params={"collection": ALPHA})
    assert doc_id in [d["doc_id"] for d in world.call("alpha-read", "GET", "/v1/documents").json()["documents"]]


def _document_file(world):
    for doc_id in world.doc_ids[BRAVO]:
        hidden = world.call("alpha-read", "GET", f"/v1/documents/{doc_id}/file")
        assert hidden.status_code == 404
        yield hidden
    own = world.call("alpha-read", "GET", f"/v1/documents/{world.doc_ids[ALPHA][0]}/file")
    assert own.status_code == 200
    yield own
    yield world.call("alpha-read", "GET", f"/v1/documents/{world.doc_ids[BRAVO][0]}/file",
                     params={"collection": BRAVO})


def _document_page(world):
    for doc_id in world.doc_ids[BRAVO]:
        hidden = world.call("alpha-read", "GET", f"/v1/documents/{doc_id}/pages/1.png")
        assert hidden.status_code == 404 and error_code(hidden) == "document_not_found"
        yield hidden
    yield world.call("alpha-read", "GET", f"/v1/documents/{world.doc_ids[BRAVO][0]}/pages/1.png",
                     params={"collection": BRAVO})


def _chunk(world):
    for chunk_id in world.chunk_ids[BRAVO]:
        hidden = world.call("alpha-read", "GET", f"/v1/chunks/{chunk_id}")
        assert hidden.status_code == 404
        yield hidden
    yield world.call("alpha-read", "GET", f"/v1/chunks/{world.chunk_ids[ALPHA][0]}")
    yield world.call("alpha-read", "GET", f"/v1/chunks/{world.chunk_ids[BRAVO][0]}", params={"collection": BRAVO})


def _evals(world):
    listed = world.call("alpha-read", "GET", "/v1/evals")
    assert [report["name"] for report in listed.json()["evals"]] == [world.reports[ALPHA]]
    yield listed
    yield world.call("alpha-read", "GET", "/v1/evals", params={"collection": BRAVO})


def _eval_file(world):
    hidden = world.call("alpha-read", "GET", f"/v1/evals/{world.reports[BRAVO]}/report.md")
    assert hidden.status_code == 404
    yield hidden
    assert world.call("alpha-read", "GET", f"/v1/evals/{world.reports[ALPHA]}/report.md").status_code == 200
    yield world.call("alpha-read", "GET", f"/v1/evals/{world.reports[BRAVO]}/report.md", params={"collection": BRAVO})


def _create_key(world):
    refused = world.call("alpha-read", "POST", "/v1/keys", json={"name": "x"})
    assert refused.status_code == 403 and error_code(refused) == "role_forbidden"
    yield refused
    for collection in (BRAVO, "*"):  # alpha's admin makes keys for alpha only
        refused = world.call("alpha-admin", "POST", "/v1/keys", json={"collection": collection})
        assert refused.status_code == 403 and error_code(refused) == "collection_forbidden"
        yield refused


def _list_keys(world):
    assert world.call("alpha-read", "GET", "/v1/keys").status_code == 403
    listed = world.call("alpha-admin", "GET", "/v1/keys")
    assert listed.status_code == 200 and {key["collection"] for key in listed.json()["keys"]} == {ALPHA}
    yield listed
    yield world.call("alpha-admin", "GET", "/v1/keys", params={"collection": BRAVO})


def _revoke_key(world):
    bravo_key = world.key_ids["bravo-write"]
    hidden = world.call("alpha-admin", "DELETE", f"/v1/keys/{bravo_key}")
    assert hidden.status_code == 404 and error_code(hidden) == "key_not_found"
    yield hidden
    yield world.call("alpha-admin", "DELETE", f"/v1/keys/{bravo_key}", params={"collection": BRAVO})
    assert world.call("bravo-write", "GET", "/v1/documents").status_code == 200  # still valid


OPEN_ROUTES = {("GET", "/v1/models")}  # what no collection holds: the answer paths
CASES = {
    ("POST", "/v1/search"): _search,
    ("POST", "/v1/ask"): _ask,
    ("POST", "/v1/chat/completions"): _chat,
    ("GET", "/v1/models"): _models,
    ("POST", "/v1/documents"): _upload,
    ("GET", "/v1/jobs/{job_id}"): _job,
    ("GET", "/v1/documents"): _list_documents,
    ("DELETE", "/v1/documents/{doc_id}"): _delete_document,
    ("GET", "/v1/documents/{doc_id}/file"): _document_file,
    ("GET", "/v1/documents/{doc_id}/pages/{page}.png"): _document_page,
    ("GET", "/v1/chunks/{chunk_id}"): _chunk,
    ("GET", "/v1/evals"): _evals,
    ("GET", "/v1/evals/{name}/{filename}"): _eval_file,
    ("POST", "/v1/keys"): _create_key,
    ("GET", "/v1/keys"): _list_keys,
    ("DELETE", "/v1/keys/{key_id}"): _revoke_key,
}


def test_every_v1_route_has_a_case(world):
    schema = world.client.get("/openapi.json").json()  # every route the app serves (none hides from the schema)
    routes = {(method.upper(), path) for path, operations in schema["paths"].items() if path.startswith("/v1")
              for method in operations}
    assert routes == set(CASES)


@pytest.mark.parametrize("route", list(CASES), ids=lambda route: f"{route[0]} {route[1]}")
def test_a_key_never_sees_another_collection(world, route):
    """Every response to a request of the other collection's key: no trace of this collection; asking for it by
    name is 403 naming only what was asked."""
    responses = list(CASES[route](world))
    assert responses
    for response in responses:
        assert_no_trace(response, world, response.victim)
    assert any(response.status_code == 403 and error_code(response) == "collection_forbidden"
               for response in responses) or route in OPEN_ROUTES, "asking for the other collection is refused"


# ---------------------------------------------------------------------------------------------- keys and roles
def test_an_upload_lands_in_the_uploaders_collection_only(world):
    hits = world.call("bravo-write", "POST", "/v1/search", json={"query": "pelican ledger vault", "k": 1}).json()
    assert hits["results"][0]["source"].endswith(UPLOADED)
    alpha_hits = world.call("alpha-read", "POST", "/v1/search", json={"query": "pelican ledger vault", "k": 10})
    assert alpha_hits.status_code == 200
    assert_no_trace(alpha_hits, world, BRAVO)


def test_environment_keys_are_admins_of_every_collection(world):
    for collection in (ALPHA, BRAVO):
        listed = world.call("env", "GET", "/v1/documents", params={"collection": collection}).json()
        assert {d["doc_id"] for d in listed["documents"]} == set(world.doc_ids[collection])
    hits = world.call("env", "POST", "/v1/search", json={"query": "kestrel code", "collection": BRAVO}).json()
    assert hits["results"] and {hit["doc_id"] for hit in hits["results"]} <= set(world.doc_ids[BRAVO])
    default = world.call("env", "GET", "/v1/documents").json()  # no collection named: the server's default
    assert default["collection"] == "default" and default["documents"] == []
    every = {key["id"] for key in world.call("env", "GET", "/v1/keys").json()["keys"]}
    assert set(world.key_ids.values()) <= every


def test_unknown_collection_names_are_refused_as_invalid(world):
    response = world.call("env", "GET", "/v1/documents", params={"collection": "../Bravo"})
    # The library's UserError: the same code as a request the schemas refuse.
    assert response.status_code == 422 and error_code(response) == "validation_error"


def test_revoked_key_is_403_at_once(world):
    created = world.call("all-admin", "POST", "/v1/keys", json={"name": "temp", "collection": ALPHA})
    assert created.status_code == 201
    key = created.json()
    assert key["secret"].startswith("rag_") and key["role"] == "read" and key["collection"] == ALPHA
    headers = {"Authorization": f"Bearer {key['secret']}"}
    assert world.client.get("/v1/documents", headers=headers).status_code == 200
    revoked = world.call("all-admin", "DELETE", f"/v1/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = world.client.get("/v1/documents", headers=headers)
    assert refused.status_code == 403 and error_code(refused) == "revoked_api_key"
    assert world.client.get("/v1/documents", headers={"Authorization": "Bearer rag_nope"}).status_code == 401
    assert world.client.get("/v1/documents").status_code == 401


def stored_key_data(settings) -> bytes:
    """Everything the key store keeps: the SQLite files (with their WAL), or the rows of the database's table."""
    if settings.store_url:
        import psycopg

        with psycopg.connect(settings.store_url) as conn:
            return repr(conn.execute("SELECT * FROM api_keys").fetchall()).encode()
    return b"".join(path.read_bytes() for path in Path(settings.index_dir).glob("store.sqlite*"))


def test_secrets_are_never_stored(world):
    from rag.store.keys import digest

    stored = stored_key_data(world.settings)
    for secret in (secret for label, secret in world.keys.items() if label != "env"):
        assert secret.encode() not in stored
        assert digest(secret).encode() in stored  # what is kept instead: the search looked in the right place
    assert world.keys["alpha-read"].encode() not in world.call("all-admin", "GET", "/v1/keys").content


def test_stored_keys_alone_turn_auth_on(world, embedder, generator):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.config import ApiSettings
    from rag.pipeline import Pipeline
    from rag.retrieve import Retriever
    from rag.store import open_store

    pipeline = Pipeline(world.settings, retriever=Retriever(open_store(world.settings), embedder),
                        generator=generator)
    app = create_app(world.settings, pipeline, ingest_embedder=embedder,
                     api_settings=ApiSettings(api_keys="", index_poll_s=0))  # no environment key
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"X-API-Key": world.keys["alpha-read"]}).status_code == 200
        assert client.get("/v1/models", headers={"X-API-Key": ENV_KEY}).status_code == 401


def test_the_write_key_deletes_in_its_own_collection(world):
    """Last of the shared world's tests: it removes bravo's upload."""
    doc_id = next(d["doc_id"] for d in world.call("bravo-write", "GET", "/v1/documents").json()["documents"]
                  if d["source"].endswith(UPLOADED))
    deleted = world.call("bravo-write", "DELETE", f"/v1/documents/{doc_id}")
    assert deleted.status_code == 200 and deleted.json()["doc_id"] == doc_id
    assert world.call("bravo-write", "DELETE", f"/v1/documents/{doc_id}").status_code == 404
    assert len(world.call("alpha-read", "GET", "/v1/documents").json()["documents"]) == 2


# ---------------------------------------------------------------------------------------------- the CLI
def test_rag_keys_create_list_revoke_round_trip(tmp_path):
    from cli import EXIT_INDEX_ERROR, EXIT_OK, EXIT_USAGE, app

    runner = CliRunner()
    index = ["--index", str(tmp_path / "index")]
    created = runner.invoke(app, ["keys", "create", "--collection", ALPHA, "--role", "write", "--name", "ci",
                                  "--json", *index])
    assert created.exit_code == EXIT_OK, created.output
    key = json.loads(created.stdout)
    assert key["secret"].startswith("rag_") and key["collection"] == ALPHA and key["role"] == "write"
    shown = runner.invoke(app, ["keys", "create", "--collection", "*", "--role", "admin", *index])
    assert shown.exit_code == EXIT_OK and shown.stdout.strip().splitlines()[-1].startswith("rag_")

    listed = json.loads(runner.invoke(app, ["keys", "list", "--json", *index]).stdout)["keys"]
    assert [(k["id"], k["role"], k["revoked_at"]) for k in listed][0] == (key["id"], "write", None)
    assert all("secret" not in k for k in listed) and len(listed) == 2

    revoked = runner.invoke(app, ["keys", "revoke", key["id"], "--json", *index])
    assert revoked.exit_code == EXIT_OK and json.loads(revoked.stdout)["revoked_at"]
    assert runner.invoke(app, ["keys", "revoke", "key_nope", *index]).exit_code == EXIT_INDEX_ERROR
    assert runner.invoke(app, ["keys", "create", "--collection", "Bad Name", *index]).exit_code == EXIT_USAGE
    assert runner.invoke(app, ["keys", "create", "--collection", ALPHA, "--role", "owner", *index]).exit_code \
        == EXIT_USAGE

    from rag.config import Settings
    from rag.store.keys import digest

    stored = stored_key_data(Settings(index_dir=tmp_path / "index"))
    assert key["secret"].encode() not in stored and digest(key["secret"]).encode() in stored


def test_cli_commands_work_in_the_collection_they_are_given(tmp_path, monkeypatch):
    from cli import EXIT_INDEX_ERROR, EXIT_OK, app

    runner = CliRunner()
    monkeypatch.setenv("RAG_INDEX_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("RAG_PARSE_WORKERS", "1")
    for collection, files in DOCUMENTS.items():
        folder = tmp_path / collection
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        result = runner.invoke(app, ["ingest", str(folder), "--collection", collection, "--json"])
        assert result.exit_code == EXIT_OK, result.output
        assert json.loads(result.stdout)["index"]["documents"] == 2  # counted in its collection
    hits = json.loads(runner.invoke(app, ["search", "kestrel launch code", "-k", "10", "--collection", ALPHA,
                                          "--json"]).stdout)
    assert hits and all(Path(hit["source"]).name in DOCUMENTS[ALPHA] for hit in hits)
    listed = json.loads(runner.invoke(app, ["documents", "list", "--collection", BRAVO, "--json"]).stdout)
    assert {Path(d["source"]).name for d in listed["documents"]} == set(DOCUMENTS[BRAVO])
    assert listed["collection"] == BRAVO and listed["counts"]["documents"] == 2
    doc_id = listed["documents"][0]["doc_id"]
    wrong = runner.invoke(app, ["documents", "delete", doc_id, "--collection", ALPHA])
    assert wrong.exit_code == EXIT_INDEX_ERROR and "kestrel" not in wrong.output and "osprey" not in wrong.output
    assert runner.invoke(app, ["documents", "delete", doc_id, "--collection", BRAVO]).exit_code == EXIT_OK
    monkeypatch.setenv("RAG_COLLECTION", BRAVO)  # the default comes from the settings
    assert len(json.loads(runner.invoke(app, ["documents", "list", "--json"]).stdout)["documents"]) == 1


def test_collection_option_is_on_every_command_that_reads_or_writes_documents():
    from cli import app

    runner = CliRunner()
    for command in (["ingest"], ["search"], ["ask"], ["chat"], ["documents", "list"], ["documents", "delete"],
                    ["eval"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert "--collection" in result.output and "RAG_COLLECTION" in result.output, command
