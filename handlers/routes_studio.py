"""GET /studio: the browser Studio, a static page (handlers/studio/) that calls this API from the
same origin. No auth on the files themselves: they hold no data, and the page sends the key the
user enters with each API call. A strict Content-Security-Policy means that even a caption that
slipped into the DOM as markup could not run a script."""
from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from .envelope import not_found

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).parent / "studio"
# Served by name from this fixed table, so no request path ever reaches the file system.
FILES = {p.relative_to(STATIC_DIR).as_posix(): p for p in STATIC_DIR.rglob("*")
         if p.is_file() and p.suffix in (".html", ".js", ".css", ".txt", ".svg")}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "media-src 'self' blob: https:; connect-src 'self' https:; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


@router.get("/studio")
async def studio_redirect() -> RedirectResponse:
    # Relative, so the page keeps working behind a path prefix (an API Gateway stage).
    return RedirectResponse("studio/", status_code=307)


@router.get("/studio/{name:path}")
async def studio_file(name: str) -> FileResponse:
    path = FILES.get(name or "index.html")
    if path is None:
        raise not_found("Not Found")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type.endswith("javascript"):
        media_type += "; charset=utf-8"
    return FileResponse(path, media_type=media_type, headers=HEADERS)
