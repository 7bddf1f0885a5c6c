"""FanOut: many parked readers are woken a slice per scheduler pass, the lots in turn.

``tests.passes`` counts the reader tasks' steps in each pass of trio's loop.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from observation import Batch, FanOut, ObservationManager
from tests.passes import steps_per_pass

from .helpers import CountingEncoder, ids, publish_many, read_all


class Recording:
    """A ParkingLot that records how many each call woke."""

    def __init__(self, name: str, calls: list[tuple[str, int | str]]) -> None:
        self._lot = trio.lowlevel.ParkingLot()
        self.name, self.calls = name, calls

    async def park(self) -> None:
        await self._lot.park()

    def __len__(self) -> int:
        return len(self._lot)

    def unpark(self, *, count: int) -> list[Any]:
        woken = self._lot.unpark(count=count)
        self.calls.append((self.name, len(woken)))
        return woken

    def unpark_all(self) -> list[Any]:
        woken = self._lot.unpark_all()
        self.calls.append((self.name, "all"))
        return woken


async def park_n(nursery: trio.Nursery, lot: Recording, n: int, woke: list[int]) -> list[int]:
    """Park ``n`` reader tasks on ``lot``; the order they parked in."""
    order: list[int] = []
    for i in range(n):

        async def parked(i: int = i) -> None:
            order.append(i)
            await lot.park()
            woke.append(i)

        nursery.start_soon(parked, name=f"reader{i}")
    await trio.testing.wait_all_tasks_blocked()
    assert len(lot) == n
    return order


async def test_without_run_a_wake_wakes_everyone_at_once() -> None:
    calls: list[tuple[str, int | str]] = []
    lot, woke = Recording("a", calls), []
    async with trio.open_nursery() as nursery:
        await park_n(nursery, lot, 10, woke)
        FanOut(per_pass=3).wake(lot)
    assert calls == [("a", "all")] and sorted(woke) == list(range(10))


async def test_a_small_lot_is_woken_at_once_a_large_one_a_slice_per_pass() -> None:
    calls: list[tuple[str, int | str]] = []
    fanout = FanOut(per_pass=3)
    small, large, woke = Recording("small", calls), Recording("large", calls), []
    async with trio.open_nursery() as nursery:
        await nursery.start(fanout.run)
        await park_n(nursery, small, 3, woke)
        fanout.wake(small)
        assert calls == [("small", "all")]  # no wait for the fan-out's task
        await trio.testing.wait_all_tasks_blocked()
        calls.clear()
        with steps_per_pass("reader") as seen:
            order = await park_n(nursery, large, 10, woke)
            seen.steps = [0]
            fanout.wake(large)
            assert fanout.backlog == 10
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert calls == [("large", 3), ("large", 3), ("large", 3), ("large", 1)]
    assert max(seen.steps) == 3 and sum(seen.steps) == 10  # never more than a slice per pass
    # The longest parked first (within a pass trio runs tasks in no set order).
    slices = [woke[3:6], woke[6:9], woke[9:12], woke[12:]]
    assert [set(s) for s in slices] == [set(order[k : k + 3]) for k in (0, 3, 6, 9)]


async def test_lots_take_turns() -> None:
    calls: list[tuple[str, int | str]] = []
    fanout = FanOut(per_pass=3)
    a, b, woke = Recording("a", calls), Recording("b", calls), []
    async with trio.open_nursery() as nursery:
        await nursery.start(fanout.run)
        await park_n(nursery, a, 10, woke)
        await park_n(nursery, b, 4, woke)
        fanout.wake(a)
        fanout.wake(b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # b is served in the second pass, not after all of a.
    assert calls == [("a", 3), ("b", 3), ("a", 3), ("b", 1), ("a", 2), ("a", 2)]


async def test_only_readers_parked_at_the_wake_are_owed() -> None:
    calls: list[tuple[str, int | str]] = []
    fanout = FanOut(per_pass=2)
    lot, early, late = Recording("a", calls), [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(fanout.run)
        await park_n(nursery, lot, 5, early)
        fanout.wake(lot)
        for i in range(3):  # parked after the wake, before the fan-out ran: nothing new for them

            async def parked(i: int = i) -> None:
                await lot.park()
                late.append(i)

            nursery.start_soon(parked, name=f"late{i}")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(early) == list(range(5)) and late == [] and len(lot) == 3
        nursery.cancel_scope.cancel()


async def test_what_is_owed_when_the_fan_out_stops_is_woken_at_once() -> None:
    calls: list[tuple[str, int | str]] = []
    fanout = FanOut(per_pass=2)
    lot, woke = Recording("a", calls), []
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as service:
            await service.start(fanout.run)
            await park_n(nursery, lot, 9, woke)
            fanout.wake(lot)
            service.cancel_scope.cancel()  # it ends after the pass it was woken for
        assert calls == [("a", 2), ("a", "all")] and fanout.backlog == 0
        await trio.testing.wait_all_tasks_blocked()
    assert sorted(woke) == list(range(9))
    fanout.wake(lot)  # stopped: at once again (nobody parked: nothing to do)


def test_per_pass_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_pass"):
        FanOut(per_pass=0)


async def test_many_observers_of_a_stream_get_everything_in_order_a_slice_per_pass() -> None:
    fanout = FanOut(per_pass=8)
    manager = ObservationManager(ring_size=64, encode=CountingEncoder(), fanout=fanout)
    stream = manager.open_stream("s1", group="g")
    got: list[list[Batch]] = [[] for _ in range(100)]
    async with trio.open_nursery() as service:
        await service.start(fanout.run)
        async with trio.open_nursery() as nursery:
            for k, into in enumerate(got):
                await nursery.start(read_all, stream, into, name=f"reader{k}")
            await trio.testing.wait_all_tasks_blocked()
            with steps_per_pass("reader") as seen:
                for _ in range(5):
                    publish_many(stream, 3)
                    await trio.lowlevel.checkpoint()  # the producer goes on meanwhile
                stream.close()
                await trio.testing.wait_all_tasks_blocked()
        service.cancel_scope.cancel()
    for into in got:
        assert ids(into) == list(range(1, 16))  # everything, in order, no duplicate
        assert len(into) < 15  # woken late, a reader takes what it missed at once
    assert max(seen.steps) <= 8  # never more than a slice of readers in one pass


async def test_observers_behind_take_turns_instead_of_filling_every_pass() -> None:
    """An observer with more to read at once (it fell behind while writing) waits
    for a pass with room, as parked ones do: passes stay a slice long."""
    fanout = FanOut(per_pass=8)
    manager = ObservationManager(ring_size=256, encode=CountingEncoder(), fanout=fanout)
    stream = manager.open_stream("s1", group="g")
    got: list[list[Batch]] = [[] for _ in range(60)]

    async def observer(into: list[Batch], *, task_status: trio.TaskStatus[None]) -> None:
        with stream.reader(0) as reader:
            task_status.started()
            async for batch in reader:
                into.append(batch)
                await trio.lowlevel.checkpoint()  # its write yields, as a socket write does

    async with trio.open_nursery() as service:
        await service.start(fanout.run)
        async with trio.open_nursery() as nursery:
            for k, into in enumerate(got):
                await nursery.start(observer, into, name=f"reader{k}")
            await trio.testing.wait_all_tasks_blocked()
            with steps_per_pass("reader") as seen:
                for _ in range(40):  # one event per pass: everyone is behind all the time
                    publish_many(stream, 1)
                    await trio.lowlevel.checkpoint()
                stream.close()
                await trio.testing.wait_all_tasks_blocked()
        service.cancel_scope.cancel()
    for into in got:
        assert ids(into) == list(range(1, 41))
    # A slice let through, and the slice before it finishing its write: 60 without turns.
    assert max(seen.steps) <= 2 * 8
