"""The web app: `/` and its static files (`/web/<file>`), plain ES modules with no build step, and the API's
request limits it checks before sending (`/web/config.json`, from api/config.py: never copied into the scripts).

The page holds no data and needs no key; everything it shows comes from the same /v1 routes, with the same key
and rules as any other client. Files are read once into memory (they are small) and revalidated by ETag.
The CSP allows scripts and styles from this origin only (no inline script or style), images from this origin
and from `blob:` (report plots fetched with the key), and no framing.
"""

from __future__ import annotations

import hashlib
import mimetypes
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.config import MAX_ANSWER_CHARS, MAX_HISTORY_TURNS, MAX_QUESTION_CHARS
from api.errors import ApiError
from rag.pages import MAX_HIGHLIGHT_CHARS

STATIC = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; manifest-src 'self'; form-action 'none'; frame-ancestors 'none'; "
                           "base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Resource-Policy": "same-origin",
                    "Cache-Control": "no-cache"}
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}

router = APIRouter(include_in_schema=False)


@cache
def _files() -> dict[str, tuple[bytes, str, str]]:
    """name → (content, content type, ETag) for every file of the static folder."""
    files = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            content = path.read_bytes()
            media_type = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files[path.name] = (content, media_type, f'"{hashlib.sha256(content).hexdigest()[:20]}"')
    return files


def _serve(name: str, request: Request) -> Response:
    found = _files().get(name)
    if found is None:
        raise ApiError(404, "not_found", f"No file '{name[:100]}' in the web app.")
    content, media_type, etag = found
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/")
async def index(request: Request) -> Response:
    return _serve("index.html", request)


@router.get("/web/config.json")
async def config() -> dict[str, int]:
    """The request limits the page checks before it sends (a question's length, the history it may send, the words
    a page image highlights)."""
    return {"max_question_chars": MAX_QUESTION_CHARS, "max_answer_chars": MAX_ANSWER_CHARS,
            "max_history_turns": MAX_HISTORY_TURNS, "max_highlight_chars": MAX_HIGHLIGHT_CHARS}


@router.get("/web/{name}")
async def static_file(name: str, request: Request) -> Response:
    return _serve(name, request)
