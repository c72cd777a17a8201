"""`rag keys create|list|revoke`: API keys scoped to a collection with a role (rag/store/keys.py; the same operations
and fields as POST/GET/DELETE /v1/keys). Only a key's SHA-256 digest is stored; its secret is printed once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from cli.app import IndexOption, JsonOption, app, console, errors, settings_from
from rag.types import ALL_COLLECTIONS, Role

if TYPE_CHECKING:
    from rag.store.keys import ApiKeyRecord, KeyStore

keys_app = typer.Typer(help="API keys for `rag serve`, each scoped to a collection with a role (read, write, "
                       "admin). Stored hashed; a key's secret is shown once, when it is created.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@contextmanager
def _key_store(index) -> Iterator[KeyStore]:
    """The configured key store, closed when the command is done with it."""
    from rag.store import open_key_store  # imports the stores (faiss): only when a keys command runs

    store = open_key_store(settings_from(index_dir=index))
    try:
        yield store
    finally:
        store.close()


def _table(records: list[ApiKeyRecord], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "name", "collection", "role", "created at", "revoked at"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(record.id, record.name, record.collection, record.role.value, record.created_at,
                      record.revoked_at or "")
    return table


@keys_app.command("create")
def keys_create(
    collection: Annotated[str, typer.Option(
        "--collection", help=f"The collection the key may use, or '{ALL_COLLECTIONS}' for every one.")],
    role: Annotated[Role, typer.Option(
        help="read: search, ask and list; write: also upload and delete; admin: also manage keys.")] = Role.READ,
    name: Annotated[str, typer.Option(help="A label for people: who or what uses the key.")] = "",
    index: IndexOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key and print its secret, once: only its digest is stored, so it cannot be shown again."""
    with _key_store(index) as store:
        record, secret = store.create(name, collection, role)
    if as_json:
        print(json.dumps({**record.to_dict(), "secret": secret}, indent=2))
        return
    console.print(_table([record], "Created API key"))
    errors.print("The secret below is shown only now; store it (send it as 'Authorization: Bearer <secret>'):")
    print(secret)


@keys_app.command("list")
def keys_list(
    collection: Annotated[Optional[str], typer.Option("--collection", help=(
        f"Only the keys of this collection ('{ALL_COLLECTIONS}': the keys of every collection); default: all "
        "keys."))] = None,
    index: IndexOption = None,
    as_json: JsonOption = False,
) -> None:
    """The keys, revoked ones included (never their secrets)."""
    with _key_store(index) as store:
        records = store.list(collection)
    if as_json:
        print(json.dumps({"keys": [record.to_dict() for record in records]}, indent=2))
    else:
        console.print(_table(records, f"{len(records)} API keys"))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `rag keys list`).")],
    index: IndexOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a key: `rag serve` answers it with 403 (within RAG_KEY_CACHE_S seconds). Exit 3 when there is none."""
    with _key_store(index) as store:
        record = store.revoke(key_id)
    if as_json:
        print(json.dumps(record.to_dict(), indent=2))
    else:
        console.print(f"Revoked {record.id} ({record.collection}, {record.role.value}) at {record.revoked_at}.")
