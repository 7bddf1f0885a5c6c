"""``GET /api/health`` (no auth) and ``GET /api/version``."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from quart import Blueprint, Response

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
    return {
        "status": status,
        "version": __version__,
        "timestamp": now_iso(),
        "database": {"engine": engine, "status": status},
        "redis": None,  # cluster mode (SPEC §9) is not configured
        "node": svc.settings.node_id,
    }, code


@bp.get("/metrics")
@authenticated("supervisor")
@operation("Prometheus metrics", produces="text/plain")
async def metrics() -> Response:
    """Prometheus text format; supervisor/admin only (it shows load, not content)."""
    svc = services()
    obs = svc.observations.statistics()
    book = await svc.db.ledger.statistics()
    gauges = {
        "chinwag_streams_open": ("Streams (model calls) in progress.", len(svc.hub.live())),
        "chinwag_observers": ("Observers attached to streams.", obs.observers),
        "chinwag_readers": ("Ring readers attached (clients + observers).", obs.readers),
        "chinwag_streams_lingering": ("Ended streams still replayable.", obs.streams_lingering),
        "chinwag_observer_lagged_events_total": (
            "Events observers were skipped past.",
            obs.lagged_total,
        ),
        "chinwag_ledger_reservations_open": ("Open credit reservations.", book.open_reservations),
        "chinwag_ledger_reserved_credits": (
            "Credits held by open reservations.",
            book.reserved_credits,
        ),
    }
    return Response(svc.telemetry.render(gauges), content_type="text/plain; version=0.0.4")


@bp.get("/api/version")
@authenticated()
@operation("The server's version")
async def version() -> dict[str, Any]:
    return {"version": __version__}
