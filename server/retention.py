"""Data retention: sessions untouched for ``CHINWAG_RETENTION_DAYS`` are deleted.

Off by default (0). A long-lived service owned by the app's services
nursery: it sweeps at start-up and then every ``SWEEP_INTERVAL_S``. Sessions
with a live stream are never deleted under it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import trio

from .db import Db
from .storage import StoreBackend
from .streams import StreamHub

log = logging.getLogger("chinwag.retention")

SWEEP_INTERVAL_S = 3600.0


def sweep(store: StoreBackend, hub: StreamHub, days: int, now: datetime | None = None) -> int:
    """Delete sessions older than ``days`` (none with a live stream or one
    being opened); how many."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    cutoff_iso = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    deleted = store.delete_sessions_before(cutoff_iso, keep=hub.busy_sessions())
    if deleted:
        log.info("retention: deleted %d sessions older than %d days", deleted, days)
    return deleted


async def run_retention(
    db: Db,
    hub: StreamHub,
    days: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await db.write(lambda store, _: sweep(store, hub, days))
    task_status.started()
    while True:
        await trio.sleep(SWEEP_INTERVAL_S)
        await db.write(lambda store, _: sweep(store, hub, days))
