"""Streams across nodes: the Publisher's copy, and a Mirror into another node's ring."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from observation import ObservationManager, Stream
from server.cluster.mirror import GAP, Mirror, mirror_encoder
from server.cluster.nodes import Identity
from server.cluster.publisher import Publisher
from server.cluster.redis import ClusterRedis, open_redis
from server.cluster.registry import Registry, StreamInfo
from server.sse import encode_event

from .conftest import REDIS_URL, OwnRedis, new_prefix


@dataclass
class Producer:
    """The node that runs the stream: its own ring, plus the Publisher's copy."""

    observations: ObservationManager
    publisher: Publisher
    registry: Registry

    async def start(self, sid: str) -> Stream:
        info = StreamInfo(sid, f"session-{sid}", "u", "m", "r", "msg", "chat", time.time(), "a")
        await self.registry.register(info)
        return self.observations.open_stream(sid, group=info.session_id)

    def publish(self, stream: Stream, name: str, data: str, *, event_id: int | None = None) -> None:
        event = stream.publish_nowait(name, data)
        self.publisher.add(stream.stream_id, event_id or event.id, name, data, tokens=1)


@asynccontextmanager
async def two_nodes(
    redis: ClusterRedis, *, ring: int = 64, mirror_ring: int | None = None, linger: float = 30
) -> AsyncIterator[tuple[Producer, Mirror]]:
    producer = Producer(
        ObservationManager(ring_size=ring, linger=30, encode=encode_event),
        Publisher(redis, ring_size=ring, buffer_ms=30_000),
        Registry(redis, Identity("a"), buffer_ms=30_000),
    )
    local = ObservationManager(
        ring_size=mirror_ring or ring, linger=linger, encode=mirror_encoder()
    )
    mirror = Mirror(redis, local, block_ms=200)
    async with trio.open_nursery() as nursery:
        await nursery.start(producer.publisher.run)
        await nursery.start(mirror.run)
        yield producer, mirror
        nursery.cancel_scope.cancel()


def chunk(i: int) -> str:
    return json.dumps({"text": f'tök {i} "q"\n'}, ensure_ascii=False)


async def read_all(stream: Stream, after: int = 0) -> bytes:
    """What an observer is sent: a reader that fell a ring behind is told ``lagged``
    (as the observe routes do), then the wire bytes."""
    out = b""
    with trio.fail_after(20), stream.reader(after) as reader:
        async for batch in reader:
            if batch.skipped:
                out += lagged(batch.skipped)
            out += batch.wire
    return out


def lagged(n: int) -> bytes:
    return f'event: lagged\ndata: {{"skipped":{n}}}\n\n'.encode()


async def test_late_join_gets_history_then_live_byte_identical(redis: ClusterRedis):
    async with two_nodes(redis) as (producer, mirror):
        stream = await producer.start("s1")
        for i in range(30):
            producer.publish(stream, "chunk", chunk(i))
        await producer.publisher.wait_idle()
        mirrored = await mirror.open("s1")
        assert mirrored is not None and mirrored.group == "session-s1" and mirrored.info == "chat"
        assert mirrored.last_id == 30  # the history is in the ring before anyone reads
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def observe() -> None:
                got.append(await read_all(mirrored))

            nursery.start_soon(observe)
            for i in range(30, 60):
                producer.publish(stream, "chunk", chunk(i))
                if i % 10 == 0:
                    await trio.sleep(0.002)
            producer.publish(stream, "done", '{"finishReason":"stop"}')
            stream.close()
            producer.publisher.end("s1")
        expected = await read_all(stream)
        assert got[0] == expected  # no gap, no duplicate, the very bytes
        assert expected.count(b"event: chunk") == 60
        assert mirrored.ended and mirror.statistics().mirrors == 0
        # A resume on the mirroring node with Last-Event-ID means the same event.
        assert await read_all(mirrored, after=45) == b"".join(
            encode_event(i, "chunk", chunk(i - 1)) for i in range(46, 61)
        ) + encode_event(61, "done", '{"finishReason":"stop"}')


async def test_a_mirror_keeps_the_ending_past_its_buffer_as_the_origin_does(
    redis: ClusterRedis,
):
    """A late or lagging observer on another node is told the same ending (SPEC §9)."""
    async with two_nodes(redis, linger=0.2) as (producer, mirror):
        stream = await producer.start("s1")
        for i in range(5):
            producer.publish(stream, "chunk", chunk(i))
        producer.publish(stream, "error", '{"errorCode":"STREAM_CANCELLED"}')
        producer.publish(stream, "done", '{"finishReason":"cancelled"}')
        stream.close(ending=2)
        producer.publisher.end("s1", ending=2)
        await producer.publisher.wait_idle()
        mirrored = await mirror.open("s1")
        assert mirrored is not None and mirrored.ended and mirrored.ended_at is not None
        await trio.sleep_until(mirrored.ended_at + 0.2)
        assert mirror.observations.get("s1") is None  # expired: the ring is released
        # Attaching now replays what is held: the ending, as on the origin.
        assert await read_all(mirrored) == encode_event(
            6, "error", '{"errorCode":"STREAM_CANCELLED"}'
        ) + encode_event(7, "done", '{"finishReason":"cancelled"}')


async def test_concurrent_opens_share_one_mirror_and_unknown_is_none(redis: ClusterRedis):
    async with two_nodes(redis) as (producer, mirror):
        stream = await producer.start("s1")
        producer.publish(stream, "chunk", chunk(0))
        await producer.publisher.wait_idle()
        opened: list[Stream | None] = []

        async def open_it() -> None:
            opened.append(await mirror.open("s1"))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(open_it)
        assert len({id(s) for s in opened}) == 1 and opened[0] is not None
        assert mirror.statistics().mirrors == 1
        assert await mirror.open("no-such-stream") is None
        assert (await mirror.open_latest("session-s1")) is opened[0]


async def test_a_node_never_mirrors_a_stream_it_is_opening(redis: ClusterRedis):
    """Registered in Redis before its open is stored and its ring opened (as
    ``StreamHub._open`` does): an observer on that node meanwhile finds no stream
    (as on one node), not a mirror that would take the run's ring's place."""
    registry = Registry(redis, Identity("a"), buffer_ms=30_000)
    observations = ObservationManager(ring_size=64, linger=30, encode=encode_event)
    mirror = Mirror(redis, observations, block_ms=200, is_mine=registry.is_mine)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        info = StreamInfo("s1", "session-s1", "u", "m", "r", "msg", "chat", time.time(), "a")
        script, ran, answered = registry._register, trio.Event(), trio.Event()

        async def reply_held(*args: Any) -> Any:
            ok = await script(*args)
            ran.set()  # in Redis now: the session's latest names it
            await answered.wait()
            return ok

        registry._register = reply_held  # type: ignore[method-assign]
        registered = trio.Event()

        async def admit() -> None:  # the open's admission
            await registry.register(info)
            registered.set()

        nursery.start_soon(admit)
        await ran.wait()
        assert await mirror.open_latest("session-s1") is None  # its reply still on the way
        answered.set()
        await registered.wait()
        assert await mirror.open_latest("session-s1") is None  # its commit comes next
        assert mirror.statistics().mirrors == 0
        own = observations.open_stream("s1", group="session-s1")  # no StreamExists
        assert await mirror.open_latest("session-s1") is own
        nursery.cancel_scope.cancel()


async def test_history_redis_trimmed_is_told_as_lagged(redis: ClusterRedis):
    async with two_nodes(redis) as (producer, mirror):
        stream = await producer.start("s1")
        for i in range(30):
            producer.publish(stream, "chunk", chunk(i))
        producer.publish(stream, "done", "{}")
        producer.publisher.end("s1")
        await producer.publisher.wait_idle()
        # Redis lost the oldest 26 of 31 (trimmed below a ring's worth; the end marker stays).
        await redis.client.xtrim(redis.keys("stream", "s1"), trim_strategy=_maxlen(), threshold=6)
        mirrored = await mirror.open("s1")
        assert mirrored is not None and mirrored.ended
        wire = await read_all(mirrored)
        assert wire == lagged(26) + b"".join(
            encode_event(i, "chunk", chunk(i - 1)) for i in range(27, 31)
        ) + encode_event(31, "done", "{}")


async def test_trimmed_history_beyond_the_ring_is_not_a_gap(redis: ClusterRedis):
    # Redis kept at least a ring's worth: as on the producer's node, a late
    # joiner starts at the oldest buffered event with nothing to report.
    async with two_nodes(redis, ring=64, mirror_ring=16) as (producer, mirror):
        stream = await producer.start("s1")
        for i in range(40):
            producer.publish(stream, "chunk", chunk(i))
        await producer.publisher.wait_idle()
        await redis.client.xtrim(redis.keys("stream", "s1"), trim_strategy=_maxlen(), threshold=20)
        mirrored = await mirror.open("s1")
        assert mirrored is not None
        with mirrored.reader(0) as reader:
            batch = reader.next_batch_nowait()
        assert batch.skipped == 0 and [e.id for e in batch.events] == list(range(25, 41))
        assert all(e.name != GAP for e in batch.events)


async def test_a_gap_while_following_is_told_where_it_is(redis: ClusterRedis):
    async with two_nodes(redis) as (producer, mirror):
        stream = await producer.start("s1")
        producer.publish(stream, "chunk", chunk(0))
        await producer.publisher.wait_idle()
        mirrored = await mirror.open("s1")
        assert mirrored is not None
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def observe() -> None:
                got.append(await read_all(mirrored))

            nursery.start_soon(observe)
            for i in range(1, 5):
                producer.publish(stream, "chunk", chunk(i))
            await producer.publisher.wait_idle()
            # The copy lost ids 6..8 (as if Redis had dropped them).
            for event_id in range(9, 12):
                producer.publisher.add("s1", event_id, "chunk", chunk(event_id - 1))
            producer.publisher.end("s1")
        assert got[0] == (
            b"".join(encode_event(i, "chunk", chunk(i - 1)) for i in range(1, 6))
            + lagged(3)
            + b"".join(encode_event(i, "chunk", chunk(i - 1)) for i in range(9, 12))
        )
        assert mirror.statistics().skipped == 3
        events = [e for e in mirrored.reader(0).__enter__().next_batch_nowait().events]
        assert [e.id for e in events] == list(range(1, 12))  # ids stay the producer's


async def test_redis_restart_mid_stream(own_redis: OwnRedis):
    """The producer's client never notices; the mirror reports exactly what it lost."""
    async with (
        open_redis(own_redis.url, prefix=new_prefix()) as redis,
        two_nodes(redis, ring=16) as (producer, mirror),
    ):
        stream = await producer.start("s1")
        for i in range(5):
            producer.publish(stream, "chunk", chunk(i))
        await producer.publisher.wait_idle()
        mirrored = await mirror.open("s1")
        assert mirrored is not None
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def observe() -> None:
                got.append(await read_all(mirrored))

            nursery.start_soon(observe)
            own_redis.stop()
            for i in range(5, 45):  # the producer keeps going
                producer.publish(stream, "chunk", chunk(i))
                await trio.sleep(0.001)
            assert stream.last_id == 45
            own_redis.start()
            await own_redis.wait_ready()
            producer.publish(stream, "done", "{}")
            stream.close()
            producer.publisher.end("s1")
            with trio.fail_after(20):
                await producer.publisher.wait_idle()
        # 46 events; the Publisher kept the newest 16 while Redis was away. The gap and
        # what follows it arrive in one read: the fillers (6..30) are pushed out of the
        # mirror's ring of 16 before the reader runs, which is then told it skipped them.
        assert got[0] == (
            b"".join(encode_event(i, "chunk", chunk(i - 1)) for i in range(1, 6))
            + lagged(25)
            + b"".join(encode_event(i, "chunk", chunk(i - 1)) for i in range(31, 46))
            + encode_event(46, "done", "{}")
        )
        # The Publisher dropped 25 of them itself, or 24 when its write of one more
        # reached the dying Redis, which lost it with everything else it held (it
        # keeps nothing on disk): the mirror's account above is the same either way.
        assert producer.publisher.statistics().dropped in (24, 25)
        assert producer.publisher.statistics().healthy
        # Its own ring (16) has its newest events, whatever Redis did.
        assert (await read_all(stream)).startswith(encode_event(31, "chunk", chunk(30)))


async def test_a_producer_in_another_process(redis: ClusterRedis):
    args = {
        "url": REDIS_URL,
        "prefix": redis.keys.prefix,
        "stream": "s-proc",
        "first": 20,
        "total": 200,
    }
    local = ObservationManager(ring_size=256, linger=30, encode=mirror_encoder())
    mirror = Mirror(redis, local, block_ms=200)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        command = [sys.executable, "-m", "tests.cluster._proc", "produce", json.dumps(args)]
        proc = await trio.lowlevel.open_process(command, stdin=-1, stdout=-1)
        assert proc.stdout is not None and proc.stdin is not None
        out = b""
        with trio.fail_after(20):
            while b"ready\n" not in out:
                out += await proc.stdout.receive_some()
            mirrored = await mirror.open("s-proc")
            assert mirrored is not None and mirrored.last_id == 20
            got: list[bytes] = []
            observed = trio.Event()

            async def observe() -> None:
                got.append(await read_all(mirrored))
                observed.set()

            nursery.start_soon(observe)
            await proc.stdin.send_all(b"go\n")
            while True:
                data = await proc.stdout.receive_some()
                if not data:
                    break
                out += data
            assert await proc.wait() == 0
            await observed.wait()
        result = json.loads(out.split(b"ready\n", 1)[1])
        # Every event the other process published, byte for byte (the rings, here and
        # in Redis, hold more than the 200: no lagged, however late a read comes).
        assert got[0] == "".join(result["wires"]).encode()
        nursery.cancel_scope.cancel()


def _maxlen():  # type: ignore[no-untyped-def]
    from coredis.tokens import PureToken

    return PureToken.MAXLEN
