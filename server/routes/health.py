"""``GET /api/health`` (no auth) and ``GET /api/version``."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from quart import Blueprint

from .. import __version__
from ..context import authenticated, services
from ..storage import StoreError
from ..store import now_iso
from ..validate import operation

bp = Blueprint("health", __name__)
log = logging.getLogger("chinwag.health")


@bp.get("/api/health")
@operation("Liveness and the database (no auth; 503 when unusable)")
async def health() -> tuple[dict[str, Any], int]:
    try:
        await services().db.store.ping()  # reads a table: proves the schema is there
        status, code = "ok", 200
    except (sqlite3.Error, StoreError) as exc:
        log.warning("health: the database cannot be used: %s", exc)
        status, code = "unavailable", 503
    except Exception as exc:  # a driver's own error (a table gone, say): still unusable
        log.warning("health: the database cannot be used: %s: %s", type(exc).__name__, exc)
        status, code = "unavailable", 503
    svc = services()
    engine = "postgresql" if svc.settings.database_url else "sqlite"
    database = {"engine": engine, "status": status}
    redis = None  # None: cluster mode (SPEC §9) is not configured
    if svc.link is not None:
        redis = await svc.link.cluster.health()
        if redis["status"] == "unavailable":
            status, code = "unavailable", 503
        elif status == "ok" and redis["status"] != "ok":
            status = "degraded"  # events queued for Redis: still serving
    elif svc.settings.redis_url:  # configured, but not joined (starting or stopping)
        redis = {"status": "unavailable"}
        status, code = "unavailable", 503
    return {
        "status": status,
        "version": __version__,
        "timestamp": now_iso(),
        "database": database,
        "redis": redis,
        "node": svc.settings.node_id,
    }, code


@bp.get("/api/version")
@authenticated()
@operation("The server's version")
async def version() -> dict[str, Any]:
    return {"version": __version__}
