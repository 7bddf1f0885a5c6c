"""``GET /api/health`` (no auth) and ``GET /api/version``."""

from __future__ import annotations

import sqlite3
from typing import Any

from quart import Blueprint

from .. import __version__
from ..context import authenticated, services
from ..store import now_iso

bp = Blueprint("health", __name__)


@bp.get("/api/health")
async def health() -> tuple[dict[str, Any], int]:
    try:
        services().store.ping()
        status, code = "ok", 200
    except sqlite3.Error:
        status, code = "unavailable", 503
    return {"status": status, "version": __version__, "timestamp": now_iso()}, code


@bp.get("/api/version")
@authenticated()
async def version() -> dict[str, Any]:
    return {"version": __version__}
