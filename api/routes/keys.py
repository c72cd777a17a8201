"""API keys, for admin keys: create (the secret is in the reply, once), list, revoke. Thin over rag/store/keys.py,
like `rag keys create|list|revoke`.

An admin key of one collection manages the keys of that collection only (another collection's key is not found,
like an unknown one); an admin key of every collection (`*`, e.g. one from RAG_API_KEYS) manages every key.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api.auth import COLLECTION_HELP, Authenticator, Principal, authorize
from api.errors import ApiError
from api.schemas import KeyCreate, KeyCreated, KeyList, KeyOut
from rag.types import ALL_COLLECTIONS, MAX_COLLECTION_NAME, Role

router = APIRouter(tags=["keys"])
ScopeQuery = Annotated[str | None, Query(max_length=MAX_COLLECTION_NAME, description=f"{COLLECTION_HELP} "
                                         f"'{ALL_COLLECTIONS}': keys of every collection; default for an "
                                         "all-collections admin: every key.")]


def _scope(request: Request, asked: str | None, every_by_default: bool) -> str | None:
    """The key scope an admin request works in: a collection, ALL_COLLECTIONS, or None (every key)."""
    principal: Principal = request.state.principal
    everything = asked == ALL_COLLECTIONS or (asked is None and every_by_default
                                              and principal.collection == ALL_COLLECTIONS)
    if not everything:
        return authorize(request, asked, Role.ADMIN)
    authorize(request, None, Role.ADMIN)  # the role, in the key's own collection
    if principal.collection != ALL_COLLECTIONS:
        raise ApiError(403, "collection_forbidden",
                       f"This API key may not use every collection ('{ALL_COLLECTIONS}').")
    return asked


def _authenticator(request: Request) -> Authenticator:
    return request.app.state.authenticator


@router.post("/keys", status_code=201, response_model=KeyCreated, summary="Create an API key (admin)",
             responses={403: {"description": "Not an admin key of this collection."}})
async def create_key(body: KeyCreate, request: Request) -> dict:
    collection = _scope(request, body.collection, every_by_default=False)
    authenticator = _authenticator(request)
    record, secret = await run_in_threadpool(authenticator.key_store.create, body.name, collection, body.role)
    authenticator.forget()  # auth turns on with the first key, in this process at once
    return {**record.to_dict(), "secret": secret}


@router.get("/keys", response_model=KeyList, summary="The API keys (admin), revoked ones included; never secrets")
async def list_keys(request: Request, collection: ScopeQuery = None) -> KeyList:
    scope = _scope(request, collection, every_by_default=True)
    records = await run_in_threadpool(_authenticator(request).key_store.list, scope)
    return KeyList(keys=[KeyOut(**record.to_dict()) for record in records])


@router.delete("/keys/{key_id}", response_model=KeyOut, summary="Revoke an API key (admin)",
               responses={404: {"description": "No such key (in this admin's collections)."}})
async def revoke_key(key_id: str, request: Request, collection: ScopeQuery = None) -> KeyOut:
    scope = _scope(request, collection, every_by_default=True)
    authenticator = _authenticator(request)
    record = await run_in_threadpool(authenticator.key_store.revoke, key_id, scope)  # KeyNotFoundError: 404
    authenticator.forget()
    return KeyOut(**record.to_dict())
