"""The timer service (server/timers.py): ordering, grid, cancellation, lots, shutdown.

Deterministic on trio's MockClock with autojump: the service's own wait is
the only deadline in these tests, so the clock jumps exactly to it.
"""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing

from server.timers import Alarm, Lot, Timers, TimersStatistics
from tests.passes import steps_per_pass


async def test_waiters_wake_in_deadline_order_never_early(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    deadlines = [0.7, 0.1, 0.5, 0.3, 0.9, 0.2, 0.1]
    woke: list[tuple[float, float]] = []

    async def waiter(d: float) -> None:
        await timers.sleep_until(d)
        woke.append((d, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for d in deadlines:
            nursery.start_soon(waiter, d)
    assert [d for d, _ in woke] == sorted(deadlines)
    assert all(at == d for d, at in woke)  # autojump: no lateness at all
    stats = timers.statistics()
    assert stats.wakeups == len(deadlines)
    assert stats.waiters == 0
    assert stats.heap == 0


async def test_grid_rounds_up_and_is_never_early(autojump_clock: trio.testing.MockClock) -> None:
    timers = Timers(grid=0.005)
    rng = random.Random(7)
    deadlines = [1 + rng.random() for _ in range(200)] + [1.005, 1.010, 2.0]
    woke: dict[float, float] = {}

    async def waiter(d: float) -> None:
        await timers.sleep_until(d)
        woke[d] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        async with trio.open_nursery() as waiters:
            for d in deadlines:
                waiters.start_soon(waiter, d)
            await trio.testing.wait_all_tasks_blocked()
            passes = timers.statistics().passes
        nursery.cancel_scope.cancel()
        passes = timers.statistics().passes - passes
    for d, at in woke.items():
        assert d <= at < d + 0.005 + 1e-9
        assert at == pytest.approx(math.ceil(d / 0.005 - 1e-9) * 0.005, abs=1e-9)
    assert woke[1.005] == pytest.approx(1.005)  # on the grid: unchanged
    # Rounding batches: one pass per grid cell in use, all of its waiters at once.
    cells = {round(at / 0.005) for at in woke.values()}
    assert passes == len(cells) < len(deadlines)


async def test_many_waiters_at_one_deadline_wake_in_one_pass(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    woke: list[float] = []

    async def waiter() -> None:
        await timers.sleep_until(2.0)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(500):
            nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        before = timers.statistics()
        assert before.waiters == 500
    after = timers.statistics()
    assert woke == [2.0] * 500
    assert after.wakeups - before.wakeups == 500
    assert after.passes - before.passes == 1


async def test_earlier_deadline_wakes_the_sleeping_service(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    woke: dict[str, float] = {}

    async def waiter(name: str, d: float) -> None:
        await timers.sleep_until(d)
        woke[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "late", 10.0)
        await trio.testing.wait_all_tasks_blocked()  # the service now sleeps until 10
        nursery.start_soon(waiter, "early", 1.0)
    assert woke == {"early": 1.0, "late": 10.0}


async def test_cancelled_waiter_is_never_rescheduled_again(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    """A waiter cancelled while parked raises at once; its old deadline wakes nobody."""
    after_cancel = trio.Event()
    release = trio.Event()
    log: list[tuple[str, float]] = []

    async def waiter(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await timers.sleep_until(5.0)
        log.append(("cancelled", trio.current_time()))
        after_cancel.set()
        # Parked elsewhere past the old deadline: a stray reschedule from the
        # service would wake this wait early (or trip trio's assertion).
        await release.wait()
        log.append(("released", trio.current_time()))

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(waiter)
        await trio.sleep(1.0)
        scope.cancel()
        await after_cancel.wait()
        stats = timers.statistics()
        assert (stats.waiters, stats.cancelled, stats.heap) == (0, 1, 1)  # dead, not yet dropped
        await trio.sleep(9.0)  # well past the old deadline
        release.set()
    assert log == [("cancelled", 1.0), ("released", 10.0)]
    stats = timers.statistics()
    assert stats.wakeups == 0
    assert stats.heap == 0  # the dead entry was dropped


async def test_cancel_scope_deadline_still_works_around_a_wait(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_at(2.0) as scope:
        await timers.sleep_until(3.0)
    assert scope.cancelled_caught
    assert trio.current_time() == 2.0
    await timers.sleep_until(4.0)
    assert trio.current_time() == 4.0


async def test_past_deadline_is_a_checkpoint(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    await trio.sleep(1.0)
    await timers.sleep_until(0.5)  # returns at once
    assert trio.current_time() == 1.0
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await timers.sleep_until(0.5)
        with pytest.raises(trio.Cancelled):
            await timers.sleep_until(7.0)  # a cancelled task does not park
    assert timers.statistics().waiters == 0


async def test_infinite_deadline_parks_until_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = Timers(grid=0.005)
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        with trio.move_on_after(3.0):
            await timers.sleep_until(math.inf)
        assert trio.current_time() == 3.0
        with pytest.raises(ValueError, match="NaN"):
            await timers.sleep_until(math.nan)
        nursery.cancel_scope.cancel()


# -- park_until: "a lot or a deadline" ------------------------------------------------------


async def test_park_until_woken_by_the_lot(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    lot = Lot()
    results: list[tuple[bool, float]] = []
    after = trio.Event()
    release = trio.Event()

    async def reader() -> None:
        results.append((await timers.park_until(lot, 5.0), trio.current_time()))
        after.set()
        await release.wait()  # past the old deadline: must not be woken by it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(1.0)
        assert len(lot) == 1
        assert lot.unpark_all() == 1
        await after.wait()
        assert len(lot) == 0
        await trio.sleep(10.0)
        assert not release.is_set()
        release.set()
    assert results == [(True, 1.0)]
    stats = timers.statistics()
    assert (stats.wakeups, stats.heap, stats.waiters) == (0, 0, 0)


async def test_park_until_deadline_first(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    lot = Lot()
    results: list[tuple[bool, float]] = []

    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            results.append((await timers.park_until(lot, 2.0), trio.current_time()))

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert len(lot) == 1
    assert results == [(False, 2.0)]
    assert len(lot) == 0
    assert lot.unpark_all() == 0  # nobody left to wake twice
    assert timers.statistics().wakeups == 1


async def test_park_until_cancelled_leaves_lot_and_heap(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    lot = Lot()
    with trio.move_on_after(1.0) as scope:
        await timers.park_until(lot, 5.0)
    assert scope.cancelled_caught
    assert len(lot) == 0
    assert timers.statistics().cancelled == 1
    assert lot.unpark_all() == 0
    await trio.sleep(10.0)
    assert timers.statistics().wakeups == 0


async def test_heartbeat_loop_interleaves_events_and_beats(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    """The reader pattern: the next event or the heartbeat, without a cancel scope."""
    lot = Lot()
    pending: list[str] = []
    seen: list[tuple[str, float]] = []

    async def reader() -> None:
        next_beat = 1.0
        while len(seen) < 6:
            if pending:
                seen.append((pending.pop(0), trio.current_time()))
            elif not await timers.park_until(lot, next_beat):
                seen.append(("beat", trio.current_time()))
                next_beat += 1.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for at in (0.25, 0.5, 2.5):
            await trio.sleep_until(at)
            pending.append(f"event@{at}")
            lot.unpark_all()
    assert seen == [
        ("event@0.25", 0.25),
        ("event@0.5", 0.5),
        ("beat", 1.0),
        ("beat", 2.0),
        ("event@2.5", 2.5),
        ("beat", 3.0),
    ]


async def test_lot_plain_park(timers: Timers, autojump_clock: trio.testing.MockClock) -> None:
    lot = Lot()
    woke: list[float] = []

    async def parked() -> None:
        await lot.park()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        nursery.start_soon(timers.park_until, lot, 9.0)
        await trio.sleep(1.0)
        assert lot.unpark_all() == 2
    assert woke == [1.0]
    with trio.move_on_after(1.0):
        await lot.park()
    assert len(lot) == 0


async def test_lot_unpark_wakes_the_longest_parked_first_and_their_deadlines_die(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    """``unpark(count=)``, as trio's ParkingLot (observation.FanOut wakes slices with it)."""
    lot = Lot()
    order: list[int] = []
    results: dict[int, tuple[bool, float]] = {}

    async def reader(i: int) -> None:
        order.append(i)
        results[i] = (await timers.park_until(lot, 5.0), trio.current_time())

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(reader, i)
        await trio.sleep(1.0)
        first = lot.unpark(count=2)
        assert len(first) == 2 and len(lot) == 3
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(results) == sorted(order[:2])  # the two that parked first
        assert len(lot.unpark(count=10)) == 3 and len(lot) == 0
    assert all(result == (True, 1.0) for result in results.values())
    assert timers.statistics().wakeups == 0  # no deadline woke anybody


async def test_dead_entries_are_compacted(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    """Waits retired early by their lot do not pile up in the heap."""
    lot = Lot()

    async def reader() -> None:
        for _ in range(2000):
            await timers.park_until(lot, trio.current_time() + 100.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for _ in range(2000):
            await trio.testing.wait_all_tasks_blocked()
            lot.unpark_all()
            assert timers.statistics().heap <= 2 + 256 + 1
    assert timers.statistics().wakeups == 0


# -- not running -----------------------------------------------------------------------------


async def test_waits_before_start_raise(autojump_clock: trio.testing.MockClock) -> None:
    timers = Timers()
    with pytest.raises(RuntimeError, match="not running"):
        await timers.sleep_until(1.0)
    with pytest.raises(RuntimeError, match="not running"):
        await timers.park_until(Lot(), 1.0)
    assert Timers().statistics() == TimersStatistics(
        running=False,
        waiters=0,
        wakeups=0,
        passes=0,
        heap=0,
        cancelled=0,
        fallbacks=0,
        grid=0.005,
    )


async def test_after_the_service_stops_waits_fall_back_to_trio(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = Timers(grid=0)
    lot = Lot()
    woke: dict[str, object] = {}

    async def sleeper() -> None:
        await timers.sleep_until(3.0)
        woke["sleeper"] = trio.current_time()

    async def reader() -> None:
        woke["reader"] = await timers.park_until(lot, 3.0)

    async with trio.open_nursery() as outer, trio.open_nursery() as service:
        await service.start(timers.run)
        outer.start_soon(sleeper)
        outer.start_soon(reader)
        await trio.sleep(1.0)
        assert timers.statistics().waiters == 2
        service.cancel_scope.cancel()  # the service stops with two parked
    # The sleeper still wakes at its own deadline; the reader's True is spurious
    # (allowed: lot waiters re-check their condition).
    assert woke == {"sleeper": 3.0, "reader": True}
    await timers.sleep_until(4.0)
    assert trio.current_time() == 4.0
    assert not await timers.park_until(lot, 5.0)
    stats = timers.statistics()
    assert not stats.running
    assert stats.fallbacks == 3
    with pytest.raises(RuntimeError, match="only once"):
        await timers.run()


async def test_run_twice_raises(timers: Timers, autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(RuntimeError, match="only once"):
        await timers.run()


def test_grid_validated() -> None:
    for bad in (-0.001, math.nan, math.inf):
        with pytest.raises(ValueError, match="grid"):
            Timers(grid=bad)


class _Mix:
    """A random mix of waits on ``lots`` with an unparker: checks each wait's end."""

    def __init__(self, *, grid: float, lots: int, seed: int) -> None:
        self.grid = grid
        self.timers = Timers(grid=grid)
        self.lots = [Lot() for _ in range(lots)]
        self.unparked: list[list[float]] = [[] for _ in self.lots]
        self.problems: list[str] = []
        self.rng = random.Random(seed)

    def check(self, deadline: float, cancel_at: float, cancelled: bool, i: int, woken: object):
        """A wait on lot ``i`` (or a sleep) ended now: cancelled on time, woken
        by an unpark of its lot before its deadline, or at its deadline."""
        t, grid = trio.current_time(), self.grid
        if cancelled:
            if t != cancel_at or cancel_at > deadline + grid:
                self.problems.append(f"cancelled at {t}, scope {cancel_at}, deadline {deadline}")
        elif woken:
            if t not in self.unparked[i] or t > deadline + grid:
                self.problems.append(f"lot wake at {t}, deadline {deadline}")
        elif not (deadline <= t < deadline + grid + 1e-9):
            self.problems.append(f"deadline {deadline} woke at {t}")

    async def run(self, worker, *, workers: int, pause: float) -> None:
        """``worker(seed)`` x ``workers`` beside an unparker; then every wait ended right."""

        async def unparker() -> None:
            while True:
                await trio.sleep(self.rng.random() * pause)
                i = self.rng.randrange(len(self.lots))
                self.unparked[i].append(trio.current_time())
                self.lots[i].unpark_all()

        async with trio.open_nursery() as nursery:
            await nursery.start(self.timers.run)
            nursery.start_soon(unparker)
            async with trio.open_nursery() as inner:
                for seed in range(workers):
                    inner.start_soon(worker, seed)
            nursery.cancel_scope.cancel()
        assert self.problems == []
        stats = self.timers.statistics()
        assert stats.waiters == 0 and stats.cancelled > 0 and stats.wakeups > 0
        assert all(len(lot) == 0 for lot in self.lots)


async def test_random_mix_of_waits_cancels_and_unparks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sleeps, lot waits, cancellations and unparks interleaved: every wait ends once, on time."""
    mix = _Mix(grid=0.001, lots=4, seed=2024)

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(30):
            now = trio.current_time()
            deadline = now + r.choice([0.0, r.random() * 0.05, r.random() * 0.5])
            cancel_at = now + r.random() * 0.6 if r.random() < 0.3 else math.inf
            i = r.randrange(len(mix.lots))
            use_lot = r.random() < 0.5
            woken = None
            with trio.move_on_at(cancel_at) as scope:
                if use_lot:
                    woken = await mix.timers.park_until(mix.lots[i], deadline)
                else:
                    await mix.timers.sleep_until(deadline)
            mix.check(deadline, cancel_at, scope.cancelled_caught, i, woken)

    await mix.run(worker, workers=200, pause=0.05)


async def test_an_alarm_keeps_one_heap_entry_per_heartbeat(
    timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    """The reader pattern with an Alarm: every wait for the same heartbeat
    revives one heap entry, and the beats still come on time."""
    lot = Lot()
    alarm = Alarm()
    pending: list[str] = []
    seen: list[tuple[str, float]] = []

    async def reader() -> None:
        next_beat = 1.0
        while len(seen) < 104:
            if pending:
                seen.append((pending.pop(0), trio.current_time()))
            elif not await timers.park_until(lot, next_beat, alarm):
                seen.append(("beat", trio.current_time()))
                next_beat += 1.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for i in range(100):  # 100 events before the first beat
            await trio.sleep_until(0.005 * (i + 1))
            pending.append("event")
            lot.unpark_all()
            await trio.testing.wait_all_tasks_blocked()
            assert timers.statistics().heap == 1  # one entry, revived each time
        for at in (1.5, 2.5):
            await trio.sleep_until(at)
            pending.append("event")
            lot.unpark_all()
    assert [kind for kind, _ in seen].count("event") == 102
    assert [t for kind, t in seen if kind == "beat"] == [1.0, 2.0]
    assert timers.statistics().wakeups == 2


async def test_random_mix_with_alarms(autojump_clock: trio.testing.MockClock) -> None:
    """Waits through alarms (deadlines repeated, passed while away, cancelled)
    interleaved with unparks: every wait ends once, on time, never early."""
    mix = _Mix(grid=0.001, lots=3, seed=7)

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        alarm = Alarm()
        deadline = trio.current_time() + r.random() * 0.2
        for _ in range(40):
            now = trio.current_time()
            if r.random() < 0.3 or deadline <= now:  # a new heartbeat, else the same one
                deadline = now + r.choice([0.0, r.random() * 0.05, r.random() * 0.3])
            cancel_at = now + r.random() * 0.4 if r.random() < 0.2 else math.inf
            i = r.randrange(len(mix.lots))
            woken = None
            with trio.move_on_at(cancel_at) as scope:
                woken = await mix.timers.park_until(mix.lots[i], deadline, alarm)
            mix.check(deadline, cancel_at, scope.cancelled_caught, i, woken)
            if r.random() < 0.3:  # away for a while: the deadline may pass meanwhile
                await trio.sleep(r.random() * 0.1)

    await mix.run(worker, workers=150, pause=0.02)


async def test_per_pass_reschedules_that_many_per_pass_earliest_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A loop that cannot keep up serves its waiters in turn, not all in one pass."""
    timers = Timers(grid=0, per_pass=4)
    parked: list[int] = []
    woke: list[tuple[int, float]] = []

    async def waiter(i: int) -> None:
        parked.append(i)
        await timers.sleep_until(1.0)
        woke.append((i, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        async with trio.open_nursery() as waiters:
            for i in range(10):
                waiters.start_soon(waiter, i, name=f"waiter{i}")
            await trio.testing.wait_all_tasks_blocked()
            with steps_per_pass("waiter") as steps:
                autojump_clock.jump(1.0)  # all ten due at once
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert all(at == 1.0 for _, at in woke)  # all in time: the clock did not move between
    assert max(steps.steps) == 4 and sum(steps.steps) == 10
    order = [i for i, _ in woke]  # in parking order, slice by slice
    assert [set(order[k : k + 4]) for k in (0, 4, 8)] == [set(parked[k : k + 4]) for k in (0, 4, 8)]
    assert timers.statistics().wakeups == 10


def test_per_pass_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_pass"):
        Timers(per_pass=0)
