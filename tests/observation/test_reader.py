"""Readers: replay then live, history framing, drain on close, cancellation."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from observation import Batch, ObservationManager

from .helpers import ids, publish_many, read_all


async def test_replay_then_live_without_gap_or_duplicate(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    publish_many(stream, 3)
    got: list[Batch] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(read_all, stream, got)
        await trio.testing.wait_all_tasks_blocked()
        assert ids(got) == [1, 2, 3]
        publish_many(stream, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert ids(got) == [1, 2, 3, 4, 5]
        stream.close()
    assert [len(b.events) for b in got] == [3, 2]  # coalesced: one batch per wake-up


@pytest.mark.parametrize(
    ("after_id", "expected_backlog", "expected_ids"),
    [
        (0, (5, 1), [1, 2, 3, 4, 5, 6]),
        (3, (2, 4), [4, 5, 6]),
        (5, (0, 6), [6]),
        (99, (0, 6), [6]),  # beyond the head: nothing replayed, continue live
    ],
)
async def test_after_id(
    manager: ObservationManager,
    after_id: int,
    expected_backlog: tuple[int, int],
    expected_ids: list[int],
) -> None:
    stream = manager.open_stream("s1", group="g")
    publish_many(stream, 5)
    with stream.reader(after_id) as reader:
        assert reader.backlog() == expected_backlog
        assert reader.history_end == 5
        publish_many(stream, 1)
        stream.close()
        got = [batch async for batch in reader]
    assert ids(got) == expected_ids


async def test_first_batch_is_exactly_the_history(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    publish_many(stream, 4)
    with stream.reader(1) as reader:
        publish_many(stream, 2)  # arrive before the reader first reads
        history = await reader.next_batch()
        live = await reader.next_batch()
    assert [e.id for e in history.events] == [2, 3, 4]
    assert reader.history_end == 4
    assert [e.id for e in live.events] == [5, 6]


async def test_joining_after_the_ring_wrapped_replays_what_is_buffered(
    manager: ObservationManager,
) -> None:
    stream = manager.open_stream("s1", group="g")  # ring of 8
    publish_many(stream, 20)
    with stream.reader(0) as reader:
        # Events gone before attaching are not lag: the backlog says where history starts.
        assert reader.backlog() == (8, 13)
        batch = reader.next_batch_nowait()
    assert batch.skipped == 0
    assert [e.id for e in batch.events] == list(range(13, 21))
    assert manager.statistics().lagged_total == 0


async def test_close_lets_readers_drain_then_end(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    waiting: list[Batch] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(read_all, stream, waiting)
        publish_many(stream, 3)
        stream.close()
    assert ids(waiting) == [1, 2, 3]
    # A reader attaching after close replays what is left, then ends.
    late: list[Batch] = []
    await read_all(stream, late)
    assert ids(late) == [1, 2, 3]
    with stream.reader(3) as reader:
        with pytest.raises(trio.EndOfChannel):
            reader.next_batch_nowait()
        with pytest.raises(trio.EndOfChannel):
            await reader.next_batch()


async def test_next_batch_nowait_would_block_when_nothing_is_pending(
    manager: ObservationManager,
) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader() as reader:
        with pytest.raises(trio.WouldBlock):
            reader.next_batch_nowait()
        publish_many(stream, 1)
        assert reader.next_batch_nowait().events[0].id == 1
        assert reader.position == 1


async def test_take_is_none_when_nothing_is_pending_then_ends(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader() as reader:
        assert reader.take() is None and reader.position == 0
        publish_many(stream, 2)
        batch = reader.take()
        assert batch is not None and [e.id for e in batch.events] == [1, 2]
        assert reader.take() is None and reader.position == 2
        stream.close()
        with pytest.raises(trio.EndOfChannel):
            reader.take()
    with pytest.raises(trio.ClosedResourceError):
        reader.take()


async def test_a_reader_cancelled_mid_wait_leaves_no_trace(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    publish_many(stream, 2)
    got: list[Batch] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(read_all, stream, got)
        await nursery.start(partial(read_all, primary=True), stream, [])
        await trio.testing.wait_all_tasks_blocked()  # both parked, waiting for event 3
        assert (stream.observers, stream.primary_attached) == (1, True)
        assert manager.statistics().readers == 2
        nursery.cancel_scope.cancel()
    assert ids(got) == [1, 2]
    assert (stream.observers, stream.primary_attached) == (0, False)
    stats = manager.statistics()
    assert (stats.readers, stats.observers) == (0, 0)
    # Nothing left parked or holding the producer back: a full ring publishes freely.
    publish_many(stream, 20)
    assert stream.last_id == 22


async def test_cancelled_next_batch_does_not_move_the_cursor(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    publish_many(stream, 2)
    with stream.reader() as reader:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await reader.next_batch()
        assert reader.position == 0
        assert [e.id for e in (await reader.next_batch()).events] == [1, 2]


async def test_two_tasks_cannot_read_one_reader(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader() as reader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.next_batch)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await reader.next_batch()
            publish_many(stream, 1)


async def test_detached_reader_refuses_to_read_and_cannot_reattach(
    manager: ObservationManager,
) -> None:
    stream = manager.open_stream("s1", group="g")
    reader = stream.reader()
    with pytest.raises(trio.ClosedResourceError):
        reader.next_batch_nowait()  # not entered yet
    with reader, pytest.raises(RuntimeError, match="already attached"), reader:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await reader.next_batch()
    assert manager.statistics().readers == 0


async def test_negative_after_id_is_refused(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    with pytest.raises(ValueError, match="after_id"):
        stream.reader(-1)


async def test_only_one_primary_reader_at_a_time(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader(primary=True):
        with pytest.raises(trio.BusyResourceError), stream.reader(primary=True):
            pass
        with stream.reader():  # observers are unlimited
            assert (stream.observers, stream.primary_attached) == (1, True)
    with stream.reader(primary=True):
        assert stream.primary_attached
    assert manager.statistics().readers == 0


async def test_next_batch_or_gives_up_when_park_says_so_and_loses_nothing(
    encode: object, autojump_clock: trio.testing.MockClock
) -> None:
    """``next_batch_or(park)``: None when ``park`` returns False (say, a heartbeat
    deadline), the cursor unmoved; the batch when a publish wakes it."""
    from server.timers import Lot, Timers

    manager = ObservationManager(ring_size=8, encode=encode, wakeup_lot=Lot)  # type: ignore[arg-type]
    timers = Timers(grid=0)
    stream = manager.open_stream("s1", group="g")
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        with stream.reader(0) as reader:
            deadline = trio.current_time() + 1
            assert await reader.next_batch_or(lambda lot: timers.park_until(lot, deadline)) is None
            assert trio.current_time() == pytest.approx(deadline)
            publish_many(stream, 2)
            batch = await reader.next_batch_or(lambda lot: timers.park_until(lot, deadline + 1))
            assert batch is not None and [e.id for e in batch.events] == [1, 2]

            async def publish_later() -> None:
                await trio.sleep(0.5)
                publish_many(stream, 1)

            nursery.start_soon(publish_later)
            t0 = trio.current_time()
            batch = await reader.next_batch_or(lambda lot: timers.park_until(lot, t0 + 10))
            assert batch is not None and [e.id for e in batch.events] == [3]
            assert trio.current_time() - t0 == pytest.approx(0.5)
            stream.close()
            with pytest.raises(trio.EndOfChannel):
                await reader.next_batch_or(lambda lot: timers.park_until(lot, t0 + 20))
        nursery.cancel_scope.cancel()
