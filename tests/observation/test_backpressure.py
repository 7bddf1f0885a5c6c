"""The primary reader (the stream's own client) is never skipped: the producer waits."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from observation import Batch, Event, ObservationManager

from .helpers import ids, publish_many


async def test_publish_nowait_refuses_and_publish_waits_for_the_primary(
    manager: ObservationManager,
) -> None:
    stream = manager.open_stream("s1", group="g")  # ring of 8
    with stream.reader(primary=True) as primary:
        publish_many(stream, 8)  # exactly a ring: nothing unread is dropped yet
        with pytest.raises(trio.WouldBlock):
            stream.publish_nowait("chunk", "{}")
        assert stream.last_id == 8  # nothing appended

        published: list[Event] = []

        async def produce() -> None:
            published.append(await stream.publish("chunk", "{}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            await trio.testing.wait_all_tasks_blocked()
            assert published == []  # still waiting for the primary
            batch = await primary.next_batch()
            assert [e.id for e in batch.events] == list(range(1, 9))
        assert [e.id for e in published] == [9]
        assert batch.skipped == 0


async def test_backpressure_slows_the_producer_to_the_primary_pace(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s1", group="g")
    got: list[Batch] = []

    async def slow_primary(task_status: trio.TaskStatus[None]) -> None:
        with stream.reader(primary=True) as reader:
            task_status.started()
            async for batch in reader:
                got.append(batch)
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        await nursery.start(slow_primary)
        for _ in range(100):
            await stream.publish("chunk", "{}")
        stream.close()
    assert ids(got) == list(range(1, 101))
    assert all(batch.skipped == 0 for batch in got)
    assert trio.current_time() >= 100 / 8 - 1  # waited: at most a ring per primary read


async def test_observers_are_skipped_while_the_primary_holds_the_producer(
    manager: ObservationManager,
) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader(primary=True) as primary, stream.reader() as observer:
        publish_many(stream, 8)
        primary.next_batch_nowait()
        publish_many(stream, 8)
        assert observer.next_batch_nowait().skipped == 8
        with pytest.raises(trio.WouldBlock):
            stream.publish_nowait("chunk", "{}")


async def test_primary_detaching_releases_a_waiting_producer(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    done: list[Event] = []

    async def produce() -> None:
        done.append(await stream.publish("chunk", "{}"))

    async with trio.open_nursery() as nursery:
        with stream.reader(primary=True):
            publish_many(stream, 8)
            nursery.start_soon(produce)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
    assert [e.id for e in done] == [9]


async def test_close_releases_a_waiting_producer_with_closed_resource_error(
    manager: ObservationManager,
) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader(primary=True):
        publish_many(stream, 8)
        async with trio.open_nursery() as nursery:

            async def produce() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.publish("chunk", "{}")

            nursery.start_soon(produce)
            await trio.testing.wait_all_tasks_blocked()
            stream.close()
    assert stream.last_id == 8


async def test_cancelled_publish_appends_nothing(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s1", group="g")
    with stream.reader(primary=True) as primary:
        publish_many(stream, 8)
        with trio.move_on_after(5) as scope:
            await stream.publish("chunk", "{}")
        assert scope.cancelled_caught
        assert stream.last_id == 8
        primary.next_batch_nowait()
        assert (await stream.publish("chunk", "{}")).id == 9
