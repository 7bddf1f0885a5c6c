"""Many readers: one publish wakes them all and they get identical bytes."""

from __future__ import annotations

import trio
import trio.testing

from observation import Batch, ObservationManager

from .helpers import CountingEncoder, ids, publish_many, read_all

READERS = 1000


async def test_a_thousand_readers_get_identical_bytes(encode: CountingEncoder) -> None:
    manager = ObservationManager(ring_size=64, encode=encode)
    stream = manager.open_stream("s1", group="g")
    publish_many(stream, 3)
    got: list[list[Batch]] = [[] for _ in range(READERS)]
    async with trio.open_nursery() as nursery:
        for into in got:
            await nursery.start(read_all, stream, into)
        await trio.testing.wait_all_tasks_blocked()
        stats = manager.statistics()
        assert (stats.readers, stats.observers, stats.peak_readers) == (READERS, READERS, READERS)
        assert all(ids(into) == [1, 2, 3] for into in got)  # the replay

        # One publish wakes every parked reader; each takes one batch.
        stream.publish_nowait("chunk", '{"text":"x"}')
        await trio.testing.wait_all_tasks_blocked()
        assert all(len(into) == 2 and ids(into[1:]) == [4] for into in got)

        # A burst before anyone runs is coalesced into one batch per reader.
        publish_many(stream, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert all(len(into) == 3 and ids(into[2:]) == list(range(5, 15)) for into in got)
        stream.close()

    late: list[Batch] = []
    await read_all(stream, late)  # a late reader replays the same buffered bytes
    expected = b"".join(batch.wire for batch in late)
    assert ids(late) == list(range(1, 15))
    assert all(b"".join(b.wire for b in into) == expected for into in got)
    assert len(encode.calls) == 14
    assert manager.statistics().readers == 0
