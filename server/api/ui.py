"""The web console's files: GET /ui (the page) and GET /ui/{asset} (its scripts and styles).

Owns: serving the static single-page app in `server/ui/` (plain ES modules, no build step, so
nothing but this package is needed at run time), from an allow-list of the files shipped there,
with headers that keep the page to its own origin (a Content-Security-Policy with no external
source: no CDN, no fonts, no frames). The page holds no secrets: it asks for the API key and
admin token and keeps them in memory, and calls only the public API (/v1, /admin, /metrics)
with the same auth as any client; these routes are public for the same reason /openapi.json is.

It knows nothing of what the page does; server.ui = false leaves these routes out.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import NotFound

router = APIRouter()

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def assets() -> dict[str, Path]:
    """Relative path -> file, for every file of a served type under server/ui (read once, on first use)."""
    return {p.relative_to(UI_DIR).as_posix(): p for p in UI_DIR.rglob("*") if p.is_file() and p.suffix in TYPES}


def _file(rel: str) -> FileResponse:
    path = assets().get(rel)
    if path is None:  # only what ships: no path from the URL ever reaches the file system
        raise NotFound(f"no such console file: {rel}", code="not_found")
    return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)


@router.get("/ui", include_in_schema=False)
async def page() -> FileResponse:
    return _file("index.html")


@router.get("/ui/{asset:path}", include_in_schema=False)
async def asset(asset: str) -> FileResponse:
    return _file(asset)
