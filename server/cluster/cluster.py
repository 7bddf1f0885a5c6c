"""The cluster's parts for one process, opened together and run as one service.

``async with open_cluster(settings, observations) as cluster:`` opens the
Redis client (raising ``ClusterUnavailable`` at once if Redis does not
answer) and builds every part around one :class:`~server.cluster.nodes.Identity`;
``await nursery.start(cluster.run, settle, handle)`` joins the cluster
(takes the node lease) and starts the long-lived tasks — lease renewal and
recovery, claim renewal, the publisher, the mirrors' readers and the signal
inbox — all owned by one nursery, ended by cancelling it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from observation import ObservationManager

from ..settings import Settings
from .claims import Admission, Claims, RateLimiter
from .mirror import Mirror
from .nodes import Identity, Node, Settle
from .publisher import Publisher
from .redis import ClusterRedis, ClusterUnavailable, open_redis
from .registry import Registry
from .signals import Handler, Signals

__all__ = ["CLAIM_LEASES", "Cluster", "open_cluster"]

#: A session claim's lease, in node leases.
CLAIM_LEASES = 3


@dataclass(slots=True)
class Cluster:
    redis: ClusterRedis
    identity: Identity
    claims: Claims
    limiter: RateLimiter
    registry: Registry
    node: Node
    publisher: Publisher
    mirror: Mirror
    signals: Signals

    async def run(
        self,
        settle: Settle,
        handle: Handler,
        on_lost: Callable[[list[Any]], Any] | None = None,
        on_claim_lost: Callable[[Admission], Any] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Join (raises ``ClusterUnavailable`` if Redis is down), then run every part."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run, settle, on_lost)
            await nursery.start(self.claims.run, on_claim_lost)
            await nursery.start(self.publisher.run)
            await nursery.start(self.mirror.run)
            await nursery.start(self.signals.run, handle)
            task_status.started()

    async def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "unavailable", "node"}`` for ``GET /api/health``."""
        try:
            await self.redis.ping()
        except ClusterUnavailable:
            return {"status": "unavailable", "node": self.identity.incarnation}
        status = "ok" if self.publisher.statistics().healthy else "degraded"
        return {"status": status, "node": self.identity.incarnation}


@asynccontextmanager
async def open_cluster(
    settings: Settings,
    observations: ObservationManager,
    *,
    prefix: str | None = None,
    info_for: Callable[[str], object] = lambda dialect: dialect,
) -> AsyncIterator[Cluster]:
    """Every part of cluster mode for this process (``settings.redis_url`` must be set)."""
    if not settings.redis_url:
        raise ValueError("cluster mode needs CHINWAG_REDIS_URL")
    async with open_redis(settings.redis_url, prefix=prefix) as redis:
        identity = Identity(settings.node_id)
        registry = Registry(redis, identity, buffer_ms=settings.stream_buffer_ms)
        yield Cluster(
            redis=redis,
            identity=identity,
            claims=Claims(
                redis,
                identity,
                # A dead node's claims are freed by the survivor's take-over at once
                # (server.cluster.nodes); a claim's own lease only bounds one leaked by
                # a cancelled admission, so it is long enough that a loop too busy to
                # renew for a whole node lease never loses a live stream's claim.
                lease_ms=CLAIM_LEASES * settings.node_lease_ms,
                max_per_user=settings.max_streams_per_user,
            ),
            limiter=RateLimiter(redis, settings.rate_limit),
            registry=registry,
            node=Node(
                redis,
                identity,
                registry,
                lease_ms=settings.node_lease_ms,
                buffer_ms=settings.stream_buffer_ms,
            ),
            publisher=Publisher(
                redis, ring_size=settings.observe_ring, buffer_ms=settings.stream_buffer_ms
            ),
            mirror=Mirror(redis, observations, info_for=info_for, is_mine=registry.is_mine),
            signals=Signals(redis, identity),
        )
