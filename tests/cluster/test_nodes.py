"""Node leases, the registry, and exactly-once recovery of a dead node's streams."""

from __future__ import annotations

import json
import sys
import time

import pytest
import trio
import trio.lowlevel

from server.cluster.nodes import Identity, Node, RecoveredStream
from server.cluster.publisher import END_ID, Publisher
from server.cluster.redis import ClusterRedis, text
from server.cluster.registry import NodeLost, Registry, StreamInfo

from .conftest import REDIS_URL

LEASE_MS = 300


def make_node(redis: ClusterRedis, name: str, lease_ms: int = LEASE_MS) -> Node:
    identity = Identity(name)
    registry = Registry(redis, identity, buffer_ms=5_000)
    return Node(redis, identity, registry, lease_ms=lease_ms, buffer_ms=5_000)


def info(i: int, node: str = "a") -> StreamInfo:
    return StreamInfo(
        stream_id=f"stream-{i}",
        session_id=f"session-{i}",
        user_id="alice",
        model_id="m",
        reservation_id=f"res-{i}",
        message_id=f"msg-{i}",
        dialect="chat",
        started_at=1_700_000_000.0 + i,
        node_id=node,
    )


async def test_a_renewed_lease_lives_an_unrenewed_one_dies(redis: ClusterRedis):
    a, b = make_node(redis, "a"), make_node(redis, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run, lambda s: [], None)
        await b.join()
        await trio.sleep(LEASE_MS * 2.5 / 1000)
        # a renews (every lease/3) and has taken b over; b never renewed.
        assert await redis.client.exists([redis.keys("node", a.identity.incarnation)])
        assert await b.renew() == -1
        members = await redis.client.smembers(redis.keys("nodes"))
        assert members == {a.identity.incarnation.encode()}
        nursery.cancel_scope.cancel()


async def test_several_survivors_recover_each_stream_exactly_once(redis: ClusterRedis):
    dead = make_node(redis, "dead")
    await dead.join()
    publisher = Publisher(redis, ring_size=64, buffer_ms=5_000)
    for i in range(5):
        await dead.registry.register(info(i))
        for event_id in range(1, 4 + i):
            publisher.add(f"stream-{i}", event_id, "chunk", f'{{"text":"t{event_id}"}}', tokens=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        await publisher.wait_idle()
        nursery.cancel_scope.cancel()
    await dead.registry.finishing("stream-4")  # it died while ending this one
    survivors = [make_node(redis, f"s{i}") for i in range(6)]
    for node in survivors:
        await node.join()
    await trio.sleep(LEASE_MS * 1.5 / 1000)  # the dead lease runs out; survivors keep theirs
    for node in survivors:
        await node.renew()
    settled: list[tuple[str, RecoveredStream]] = []

    def settler(name: str):  # type: ignore[no-untyped-def]
        async def settle(stream: RecoveredStream) -> list[tuple[str, str]]:
            settled.append((name, stream))
            await trio.lowlevel.checkpoint()  # others run meanwhile
            return [("error", '{"errorCode":"NODE_LOST"}'), ("done", '{"finishReason":"error"}')]

        return settle

    async with trio.open_nursery() as nursery:
        for node in survivors:
            nursery.start_soon(node.recover, settler(node.identity.node_id))
    ids = sorted(stream.stream_id for _, stream in settled)
    assert ids == [f"stream-{i}" for i in range(5)]  # each once
    assert len({name for name, _ in settled}) == 1  # one survivor took the dead node over
    for _, stream in settled:
        i = int(stream.stream_id.split("-")[1])
        assert stream.tokens == 3 + i and stream.last_id == 3 + i
        assert (stream.session_id, stream.reservation_id, stream.message_id) == (
            f"session-{i}",
            f"res-{i}",
            f"msg-{i}",
        )
        assert stream.ended is False
        entries = await redis.client.xrange(redis.keys("stream", stream.stream_id))
        tail = [(text(e.identifier), dict(e.field_values)) for e in entries[-3:]]
        last = stream.last_id
        assert tail[0][0] == f"0-{last + 1}" and tail[0][1][b"n"] == b"error"
        assert tail[1][0] == f"0-{last + 2}" and tail[1][1][b"n"] == b"done"
        assert tail[2][0] == END_ID and tail[2][1][b"end"] == str(last + 2).encode()
    # Nothing is left to recover, and nothing is listed live.
    assert [await node.recover(settler("again")) for node in survivors] == [0] * 6
    assert await survivors[0].registry.active() == []


async def test_several_processes_recover_exactly_once(redis: ClusterRedis):
    dead = make_node(redis, "dead", lease_ms=200)
    await dead.join()
    for i in range(6):
        await dead.registry.register(info(i))
    await trio.sleep(0.3)
    args = {"url": REDIS_URL, "prefix": redis.keys.prefix, "start_at": time.time() + 1.5}
    results: list[dict[str, list[str]]] = []

    async def run(node: str) -> None:
        command = [
            sys.executable,
            "-m",
            "tests.cluster._proc",
            "recover",
            json.dumps({**args, "node": node}),
        ]
        done = await trio.run_process(command, capture_stdout=True)
        results.append(json.loads(done.stdout))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(run, f"p{i}")
    settled = sorted(s for r in results for s in r["settled"])
    assert settled == [f"stream-{i}" for i in range(6)]


async def test_a_node_that_comes_back_finds_its_streams_recovered(redis: ClusterRedis):
    paused = make_node(redis, "paused")
    await paused.join()
    await paused.registry.register(info(1, "paused"))
    await trio.sleep(LEASE_MS * 1.5 / 1000)  # paused: no renewal
    survivor = make_node(redis, "survivor")
    await survivor.join()

    async def settle(stream: RecoveredStream) -> list[tuple[str, str]]:
        return [("done", "{}")]

    assert await survivor.recover(settle) == 1
    # It comes back: renewing tells it it was taken over, and nothing is resurrected.
    assert await paused.renew() == -1
    assert await paused.registry.finishing("stream-1") is False  # the survivor settled it
    with pytest.raises(NodeLost):
        await paused.registry.register(info(2, "paused"))
    assert await paused.renew() == -1  # its lease is not re-created either
    assert not await redis.client.exists([redis.keys("node", paused.identity.incarnation)])
    assert await survivor.recover(settle) == 0


async def test_run_goes_on_as_a_new_incarnation_after_a_take_over(redis: ClusterRedis):
    node = make_node(redis, "n")
    lost: list[list[StreamInfo]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run, lambda s: [], lost.append)
        first = node.identity.incarnation
        await node.registry.register(info(1, "n"))
        # A survivor takes it over while it is paused (its keeper too: a renewal
        # between the lease's end and the take-over would take the lease back).
        await trio.to_thread.run_sync(node.keeper.stop)
        await redis.client.delete([redis.keys("node", first)])
        survivor = make_node(redis, "survivor")
        await survivor.join()
        assert await survivor.take_over(first) == ["stream-1"]
        node.keeper.start()  # it comes back
        with trio.fail_after(5):
            await node.identity.lost.wait()
            # The node has no event for "joined again": look until it has.
            while node.identity.incarnation == first:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert [[s.stream_id for s in streams] for streams in lost] == [["stream-1"]]
        await node.registry.register(info(2, "n"))  # the new incarnation may start streams
        nursery.cancel_scope.cancel()


async def test_an_expired_lease_nobody_took_is_taken_back_with_its_streams(redis: ClusterRedis):
    node = make_node(redis, "n")
    await node.join()
    await node.registry.register(info(1, "n"))
    # Redis forgets everything about it (a restart without persistence, say).
    await redis.delete_prefix()
    assert await node.renew() == 0
    assert await node.registry.finishing("stream-1") is True
    active = await node.registry.active()
    assert [row.info.stream_id for row in active] == ["stream-1"]


async def test_the_owner_and_a_survivor_never_both_end_a_stream(redis: ClusterRedis):
    owner = make_node(redis, "owner")
    await owner.join()
    await owner.registry.register(info(1, "owner"))
    await owner.registry.register(info(2, "owner"))
    assert await owner.registry.finishing("stream-1") is True  # the owner ends it first
    await owner.registry.finished("stream-1")
    await redis.client.delete([redis.keys("node", owner.identity.incarnation)])
    survivor = make_node(redis, "survivor")
    await survivor.join()
    got: list[str] = []

    async def settle(stream: RecoveredStream) -> list[tuple[str, str]]:
        got.append(stream.stream_id)
        return []

    await survivor.recover(settle)
    assert got == ["stream-2"]
    assert await owner.registry.finishing("stream-2") is False


async def test_active_lists_the_cluster_with_observers_per_node(redis: ClusterRedis):
    a, b = make_node(redis, "a"), make_node(redis, "b")
    await a.join()
    await b.join()
    await a.registry.register(info(1, "a"))
    await b.registry.register(info(2, "b"))
    await a.registry.set_observers("stream-2", 2)
    await b.registry.set_observers("stream-2", 3)
    rows = await a.registry.active()
    assert [(r.info.stream_id, r.info.node_id, r.observers) for r in rows] == [
        ("stream-1", "a", 0),
        ("stream-2", "b", 5),
    ]
    assert await b.registry.latest("session-2") == "stream-2"
    await b.registry.finishing("stream-2")
    await b.registry.finished("stream-2")
    assert [r.info.stream_id for r in await a.registry.active()] == ["stream-1"]
    assert await b.registry.latest("session-2") == "stream-2"  # within the buffer
    ttl = await redis.client.pttl(redis.keys("session", "session-2", "latest"))
    assert 0 < ttl <= 5_000
    assert await a.leave() is False  # stream-1 is still live
    await a.registry.finishing("stream-1")
    await a.registry.finished("stream-1")
    assert await a.leave() is True
