"""The lease keeper: a node's lease renewed from a thread while its loop beats."""

from __future__ import annotations

import time

import trio

from server.cluster.lease import LeaseKeeper
from server.cluster.nodes import _RENEW, Identity, Node
from server.cluster.redis import ClusterRedis
from server.cluster.registry import Registry

from .conftest import REDIS_URL, OwnRedis
from .conftest import own_redis as own_redis  # the fixture
from .nodes import until_true

LEASE_MS = 600


def keeper_for(redis: ClusterRedis, incarnation: str) -> LeaseKeeper:
    keys = redis.keys

    def args() -> tuple[list[str], list[str | int]]:
        lease = keys("node", incarnation)
        return [lease, keys("node", incarnation, "taken"), keys("nodes")], [LEASE_MS, incarnation]

    return LeaseKeeper(REDIS_URL, _RENEW, args, lease_ms=LEASE_MS)


async def test_the_lease_lives_while_the_loop_beats_and_lapses_when_it_stops(redis):
    keeper = keeper_for(redis, "n.1")
    lease = redis.keys("node", "n.1")
    assert keeper.renew_once() == 0  # no lease yet: taken
    keeper.start()
    try:
        # Three leases long, beating: never gone.
        for _ in range(18):
            keeper.beat()
            await trio.sleep(0.1)
            assert await redis.client.pttl(lease) > 0
        assert keeper.outcome == 1

        # The loop stops beating (hung): the keeper lets the lease lapse.
        async def lapsed() -> bool:
            return not await redis.client.exists([lease])

        await until_true(lapsed, within=3)
    finally:
        await trio.to_thread.run_sync(keeper.stop)


async def test_a_taken_over_node_is_told_and_not_revived(redis):
    keeper = keeper_for(redis, "n.2")
    try:
        assert keeper.renew_once() == 0
        await redis.client.set(redis.keys("node", "n.2", "taken"), "survivor")
        assert keeper.renew_once() == -1
        await redis.client.delete([redis.keys("node", "n.2")])
        assert keeper.renew_once() == -1
        assert not await redis.client.exists([redis.keys("node", "n.2")])
    finally:
        keeper.stop()


async def test_a_node_keeps_its_lease_when_its_own_client_stalls(redis):
    """The lease does not depend on the loop's shared Redis client: a renewal through
    it that never returns (a client stuck behind big pipelines) costs nothing."""
    identity = Identity("stalls")
    registry = Registry(redis, identity, buffer_ms=1000)
    node = Node(redis, identity, registry, lease_ms=LEASE_MS, buffer_ms=1000)

    async def settle(stream: object) -> list[tuple[str, str]]:
        return []

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run, settle)

        async def stuck(*args: object, **kwargs: object) -> None:
            await trio.sleep_forever()

        node._renew = stuck  # what the loop would use; the keeper has its own connection
        lease = redis.keys("node", identity.incarnation)
        for _ in range(30):  # five leases
            await trio.sleep(0.1)
            assert await redis.client.pttl(lease) > 0
        assert not identity.lost.is_set()
        nursery.cancel_scope.cancel()


async def test_the_keeper_reconnects_after_redis_restarts(own_redis: OwnRedis):
    from server.cluster.redis import Keys

    keys = Keys("chinwag-test-lease:")
    incarnation = "n.3"

    def args() -> tuple[list[str], list[str | int]]:
        lease = keys("node", incarnation)
        return [lease, keys("node", incarnation, "taken"), keys("nodes")], [LEASE_MS, incarnation]

    keeper = LeaseKeeper(own_redis.url, _RENEW, args, lease_ms=LEASE_MS)
    assert keeper.renew_once() == 0
    assert keeper.renew_once() == 1
    own_redis.stop()
    own_redis.start()
    await own_redis.wait_ready()
    keeper.start()
    try:
        deadline = time.monotonic() + 5
        while keeper.outcome != 0 and time.monotonic() < deadline:  # re-acquired: Redis lost it
            keeper.beat()
            await trio.sleep(0.05)
        assert keeper.outcome == 0
    finally:
        await trio.to_thread.run_sync(keeper.stop)


async def test_a_short_lease_is_renewed_while_the_loop_runs(redis, caplog):
    """The loop beats several times per half lease whatever the lease (down to the
    100 ms minimum): a live, idle node never reads as hung to its own keeper."""
    identity = Identity("short")
    registry = Registry(redis, identity, buffer_ms=1000)
    node = Node(redis, identity, registry, lease_ms=200, buffer_ms=1000)

    async def settle(stream: object) -> list[tuple[str, str]]:
        return []

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run, settle)
        lease = redis.keys("node", identity.incarnation)
        for _ in range(40):  # ten leases
            await trio.sleep(0.05)
            assert await redis.client.pttl(lease) > 0
        nursery.cancel_scope.cancel()
    assert "lease not renewed" not in caplog.text
