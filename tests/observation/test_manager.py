"""The manager: registry, groups, waiting for the next stream, linger, statistics."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import trio
import trio.testing

from observation import ObservationManager, ObservationStatistics, Stream, StreamExists

from .helpers import CountingEncoder, publish_many


async def test_open_get_latest_active(manager: ObservationManager) -> None:
    a = manager.open_stream("a", group="chat1", info={"user": 1})
    b = manager.open_stream("b", group="chat2")
    assert a.info == {"user": 1}
    assert manager.get("a") is a
    assert manager.get("nope") is None
    assert manager.latest("chat1") is a
    assert manager.latest("chat3") is None
    assert manager.active() == [a, b]
    a.close()
    assert manager.active() == [b]
    c = manager.open_stream("c", group="chat1")
    assert manager.latest("chat1") is c  # newest of the group, live or lingering
    c.close()
    assert manager.latest("chat1") is c
    assert manager.get("a") is a  # lingering streams are still readable


async def test_duplicate_stream_id_raises(manager: ObservationManager) -> None:
    manager.open_stream("a", group="g").close()
    with pytest.raises(StreamExists) as info:
        manager.open_stream("a", group="g")  # still lingering
    assert info.value.stream_id == "a"


async def test_bad_parameters_are_refused(encode: CountingEncoder) -> None:
    with pytest.raises(ValueError, match="ring_size"):
        ObservationManager(ring_size=0, encode=encode)
    with pytest.raises(ValueError, match="linger"):
        ObservationManager(linger=-1, encode=encode)


async def test_wait_for_stream_gets_the_next_stream_of_its_group(
    manager: ObservationManager,
) -> None:
    manager.open_stream("old", group="g")  # already open: not "the next"
    got: list[Stream] = []

    async def wait() -> None:
        got.append(await manager.wait_for_stream("g"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert manager.statistics().waiters == 2
        manager.open_stream("other", group="h")
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        new = manager.open_stream("new", group="g")
    assert got == [new, new]
    assert manager.statistics().waiters == 0


async def test_cancelled_wait_for_stream_leaves_no_trace(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(10) as scope:
        await manager.wait_for_stream("g")
    assert scope.cancelled_caught
    assert manager.statistics().waiters == 0
    assert manager._arrivals == {}
    manager.open_stream("s", group="g")  # nobody to wake, nothing breaks


async def test_get_forgets_a_stream_after_linger_without_run(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s", group="g")
    publish_many(stream, 5)
    stream.close()
    await trio.sleep(29.9)
    assert manager.get("s") is stream
    assert manager.latest("g") is stream
    assert manager.statistics().streams_lingering == 1
    await trio.sleep(0.1)
    assert manager.get("s") is None
    assert manager.latest("g") is None
    stats = manager.statistics()
    assert (stats.streams_lingering, stats.events_buffered) == (0, 0)
    manager.open_stream("s", group="g")  # the id is free again


async def test_run_frees_expired_streams_and_their_memory(
    encode: CountingEncoder, autojump_clock: trio.testing.MockClock
) -> None:
    manager = ObservationManager(ring_size=8, linger=30.0, encode=encode)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        stream = manager.open_stream("s", group="g")
        publish_many(stream, 20)
        with stream.reader() as reader:
            reader.next_batch_nowait()
        ref = weakref.ref(stream)
        stream.close()
        del stream, reader
        await trio.sleep(31)
        # No lookup has run: only run() can have freed it.
        gc.collect()
        assert ref() is None
        assert manager.statistics().events_buffered == 0
        nursery.cancel_scope.cancel()


async def test_run_sleeps_until_the_next_expiry_and_wakes_when_a_stream_ends(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    def next_deadline() -> float:
        return trio.lowlevel.current_statistics().seconds_to_next_deadline

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        stream = manager.open_stream("s", group="g")
        await trio.testing.wait_all_tasks_blocked()
        assert next_deadline() == math.inf  # nothing lingers: no tick, no deadline
        stream.close()
        await trio.testing.wait_all_tasks_blocked()
        assert next_deadline() == pytest.approx(30.0)
        await trio.sleep(10)
        manager.open_stream("t", group="g").close()  # expires after "s": no new wake-up needed
        await trio.testing.wait_all_tasks_blocked()
        assert next_deadline() == pytest.approx(20.0)
        await trio.sleep(21)
        assert manager._streams.keys() == {"t"}
        assert next_deadline() == pytest.approx(9.0)
        await trio.sleep(10)
        assert manager._streams == {}
        assert next_deadline() == math.inf
        with pytest.raises(RuntimeError, match="already running"):
            await manager.run()
        nursery.cancel_scope.cancel()


async def test_a_reader_still_attached_at_expiry_is_told_the_rest_as_skipped_then_the_ending(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s", group="g")
    publish_many(stream, 5)
    stream.close(ending=2)
    with stream.reader() as stuck:
        assert [e.id for e in stuck.next_batch_nowait().events] == [1, 2, 3, 4, 5]
    with stream.reader() as stuck:
        await trio.sleep(31)
        assert manager.get("s") is None  # expiry releases the ring, but its ending
        batch = await stuck.next_batch()
        assert ([e.id for e in batch.events], batch.skipped) == ([4, 5], 3)
        assert batch.wire == b"".join(e.wire for e in batch.events)
        with pytest.raises(trio.EndOfChannel):
            await stuck.next_batch()


async def test_a_reader_attaching_after_expiry_replays_only_the_ending(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s", group="g")
    publish_many(stream, 5)
    stream.close()  # by default the newest event is the ending
    await trio.sleep(31)
    assert manager.get("s") is None
    with stream.reader() as late:
        assert (late.backlog(), late.history_end) == ((1, 5), 5)
        assert [e.id for e in late.next_batch_nowait().events] == [5]
        with pytest.raises(trio.EndOfChannel):
            late.next_batch_nowait()


async def test_a_stream_closed_with_no_ending_keeps_nothing(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s", group="g")
    publish_many(stream, 5)
    stream.close(ending=0)
    with stream.reader() as stuck:
        await trio.sleep(31)
        assert manager.get("s") is None
        batch = await stuck.next_batch()
        assert (batch.events, batch.skipped, batch.wire) == ((), 5, b"")
        with pytest.raises(trio.EndOfChannel):
            await stuck.next_batch()


async def test_zero_linger_forgets_at_once(encode: CountingEncoder) -> None:
    manager = ObservationManager(linger=0, encode=encode)
    manager.open_stream("s", group="g").close()
    assert manager.get("s") is None


async def test_statistics_reflect_streams_readers_and_lag(manager: ObservationManager) -> None:
    assert manager.statistics() == ObservationStatistics(0, 0, 0, 0, 0, 0, 0, 0)
    a = manager.open_stream("a", group="g")
    b = manager.open_stream("b", group="g")
    publish_many(a, 3)
    publish_many(b, 20)  # ring of 8 holds the last 8
    b.close()
    with a.reader(primary=True), a.reader(), b.reader():
        assert manager.statistics() == ObservationStatistics(
            streams_live=1,
            streams_lingering=1,
            readers=3,
            observers=2,
            events_buffered=11,
            lagged_total=0,
            peak_readers=3,
            waiters=0,
        )
        assert (a.observers, a.primary_attached, b.observers) == (1, True, 1)
    with b.reader(0) as late:
        # Attaching clamps into the ring; lag is counted only when it happens while attached.
        assert late.next_batch_nowait().skipped == 0
    with a.reader() as slow:
        publish_many(a, 10)
        assert slow.next_batch_nowait().skipped == 5
    stats = manager.statistics()
    assert (stats.readers, stats.observers, stats.peak_readers) == (0, 0, 3)
    assert stats.lagged_total == 5
