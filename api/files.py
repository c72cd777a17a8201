"""Files from disk whose content nobody vetted (uploaded documents, evaluation reports), served so they cannot act.

The browser must never run such a file as a page of this origin, where it could call /v1 with the user's key:
only types that cannot carry script are sent inline (PDF, plain text, PNG, Markdown and JSON as data), everything
else as a download; `nosniff` stops the browser from guessing HTML, and a `sandbox` CSP puts the file in an opaque
origin with scripts and plugins off even if it is opened directly.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from starlette.responses import FileResponse

INLINE_TYPES = {".pdf": "application/pdf", ".png": "image/png", ".json": "application/json",
                ".md": "text/markdown; charset=utf-8"}
# Served as text/plain: formats that are text (HTML included: shown as its source, never rendered).
TEXT_SUFFIXES = {".txt", ".text", ".markdown", ".rst", ".csv", ".html", ".htm"}
MEDIA_TYPES = sorted({*INLINE_TYPES.values(), "text/plain; charset=utf-8", "application/octet-stream"})  # for OpenAPI
UNTRUSTED_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'",
                     "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "private, no-cache"}


def untrusted_file(path: Path, download_name: str | None = None) -> FileResponse:
    """`path` with a content type chosen by its suffix from the lists above, never by its content."""
    suffix = path.suffix.lower()
    name = quote(download_name or path.name)
    if suffix in INLINE_TYPES or suffix in TEXT_SUFFIXES:
        media_type, disposition = INLINE_TYPES.get(suffix, "text/plain; charset=utf-8"), "inline"
    else:  # office formats and anything else: the user's own application opens them, not this page
        media_type, disposition = "application/octet-stream", "attachment"
    return FileResponse(path, media_type=media_type, headers={
        **UNTRUSTED_HEADERS, "Content-Disposition": f"{disposition}; filename*=UTF-8''{name}"})
