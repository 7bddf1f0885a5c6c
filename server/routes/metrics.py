"""``GET /metrics``: Prometheus metrics (supervisor/admin; load, never content).

One process: its own metrics. A worker of ``chinwag serve --workers N``
(``PROMETHEUS_MULTIPROC_DIR`` set): every worker's, summed, whichever worker
answers (``server/telemetry.py`` says how).
"""

from __future__ import annotations

from functools import partial

from quart import Blueprint, Response, current_app

from ..context import Services, authenticated, services
from ..validate import operation

bp = Blueprint("metrics", __name__)


def local_gauges(svc: Services) -> dict[str, float]:
    """This process's own gauges, from the hub and the observation manager."""
    obs = svc.observations.statistics()
    return {
        "chinwag_streams_open": len(svc.hub.live()),
        "chinwag_observers": obs.observers,
        "chinwag_readers": obs.readers,
        "chinwag_streams_lingering": obs.streams_lingering,
        "chinwag_observer_lagged_events_total": obs.lagged_total,
    }


@bp.get("/metrics")
@authenticated("supervisor")
@operation("Prometheus metrics", produces="text/plain")
async def metrics() -> Response:
    """Prometheus text format; supervisor/admin only (it shows load, not content)."""
    svc = services()
    book = await svc.db.ledger.statistics()  # the database's: read here, once, by this process
    svc.telemetry.set_local(local_gauges(svc))
    text = svc.telemetry.render(
        {
            "chinwag_ledger_reservations_open": book.open_reservations,
            "chinwag_ledger_reserved_credits": book.reserved_credits,
        }
    )
    return Response(text, content_type="text/plain; version=0.0.4")


@bp.before_app_serving
async def keep_local_gauges_current() -> None:
    """Several processes: this one's gauges must be current when another is scraped."""
    svc = services()
    if svc.telemetry.multiprocess_dir:
        current_app.add_background_task(svc.telemetry.keep_current, partial(local_gauges, svc))


@bp.after_app_serving
async def stop_local_gauges() -> None:
    services().telemetry.stop()
