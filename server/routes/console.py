"""The web console (SPEC §10): ``GET /`` and its static files, shipped in the package.

Plain HTML, CSS and JavaScript modules from ``server/console/`` (package data,
no build step). The console is a client like any other: it speaks only the
public API, with the token in the tab's ``sessionStorage``. Every response
here carries a Content-Security-Policy that allows nothing but the console's
own files and API calls to this origin: no inline script or style, no other
host, no plugin, no framing, no native form submission.

Only files that exist in the package are served, looked up by exact name in
a table built once; anything else is the usual JSON 404.
"""

from __future__ import annotations

import functools
from importlib import resources

from quart import Blueprint, Response

from ..errors import NotFound
from ..validate import operation

bp = Blueprint("console", __name__)

#: What the console's pages may load and do: their own scripts, styles and API calls.
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: always revalidated, so an upgrade is picked up at the next load.
    "Cache-Control": "no-cache",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@functools.cache
def files() -> dict[str, bytes]:
    """Every console file by name (``app.js``), read once from the package."""
    root = resources.files("server") / "console"
    return {
        entry.name: entry.read_bytes()
        for entry in root.iterdir()
        if entry.is_file() and any(entry.name.endswith(ext) for ext in TYPES)
    }


def _serve(name: str) -> Response:
    body = files().get(name)
    if body is None or "/" in name:
        raise NotFound("No such console file.")
    content_type = TYPES["." + name.rsplit(".", 1)[-1]]
    return Response(body, status=200, content_type=content_type, headers=HEADERS)


@bp.get("/")
@operation("The web console (SPEC §10): its page, no auth needed", produces="text/html")
async def index() -> Response:
    return _serve("index.html")


@bp.get("/console/<name>.js")
@operation("A script module of the web console", produces="text/javascript")
async def script(name: str) -> Response:
    return _serve(f"{name}.js")


@bp.get("/console/<name>.css")
@operation("A style sheet of the web console", produces="text/css")
async def style(name: str) -> Response:
    return _serve(f"{name}.css")
