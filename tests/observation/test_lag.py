"""A slow observer is skipped forward, told exactly how much, and slows no one."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from observation import Batch, ObservationManager

from .helpers import chunk, ids, publish_many, read_all


async def test_lagged_observer_is_told_exactly_what_it_missed(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")  # ring of 8
    with stream.reader() as slow:
        publish_many(stream, 30)  # never blocks: observers do not hold the producer
        assert stream.last_id == 30
        batch = slow.next_batch_nowait()
        assert batch.skipped == 22
        assert [e.id for e in batch.events] == list(range(23, 31))  # from the oldest buffered
        assert batch.wire == b"".join(e.wire for e in batch.events)
        publish_many(stream, 2)
        batch = slow.next_batch_nowait()
        assert (batch.skipped, [e.id for e in batch.events]) == (0, [31, 32])
    assert manager.statistics().lagged_total == 22


async def test_a_lagging_observer_does_not_slow_others(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    fast: list[Batch] = []
    primary: list[Batch] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(read_all, stream, fast)
        await nursery.start(partial(read_all, primary=True), stream, primary)
        with stream.reader():  # attached, never reads
            for _ in range(10):
                publish_many(stream, 5)  # publish_nowait never raises for the observer
                await trio.testing.wait_all_tasks_blocked()
        stream.close()
    assert ids(fast) == ids(primary) == list(range(1, 51))
    assert all(b.skipped == 0 for b in fast + primary)


async def test_a_batch_keeps_its_events_after_the_ring_has_moved_on(
    manager: ObservationManager,
) -> None:
    """A sliced batch builds its events only when asked (SSE readers never ask):
    what it was sliced from stays true after the ring has overwritten it."""
    stream = manager.open_stream("s1", group="g")  # ring of 8
    with stream.reader() as late:
        publish_many(stream, 5)
        batch = late.next_batch_nowait()
        wire = batch.wire
        publish_many(stream, 20)  # every slot of the ring written again, twice
        assert (batch.first_id, batch.last_id, batch.skipped) == (1, 5, 0)
        assert [e.id for e in batch.events] == [1, 2, 3, 4, 5]
        assert [e.data for e in batch.events] == [chunk(i) for i in range(1, 6)]
        assert batch.wire == wire == b"".join(e.wire for e in batch.events)
        behind = late.next_batch_nowait()  # 20 more, of which the ring holds 8
        assert (behind.skipped, behind.first_id, behind.last_id) == (12, 18, 25)
        assert [e.id for e in behind.events] == list(range(18, 26))
