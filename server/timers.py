"""The process's one timer service: deadlines without a cancel scope per wait (DESIGN.md §2).

A trio sleep is a cancel scope that expires and raises ``Cancelled`` into
the task. At thousands of deadlines a second (token pacing, heartbeats)
that machinery becomes most of the process's CPU. :class:`Timers` keeps
every such deadline of the process in one heap, served by one task: a
waiter parks with :func:`trio.lowlevel.wait_task_rescheduled`, and the
service, woken at the earliest deadline, reschedules every due waiter in
one pass with :func:`trio.lowlevel.reschedule`. The service's own wait is
the only trio sleep involved: one per pass, not one per waiter. Cancel
scopes stay what they are for: aborting work.

Usage::

    timers = Timers(grid=0.005)
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        ...
        await timers.sleep_until(deadline)             # pacing
        woken = await timers.park_until(lot, deadline)  # "X or deadline"

"Wait for X or until a deadline" (a reader waiting for its next event or
its heartbeat) uses a :class:`Lot`: a parking lot like
:class:`trio.lowlevel.ParkingLot` whose waiters may also hold a deadline
in the heap. Whichever comes first — :meth:`Lot.unpark_all` or the
deadline — wakes the waiter, exactly once, and retires the other
registration, so no cancel scope is entered per wait::

    next_beat = trio.current_time() + interval
    while True:
        if (batch := take()) is not None:
            write(batch)
        elif not await timers.park_until(lot, next_beat):
            write(heartbeat)
            next_beat += interval

Guarantees:

- A waiter never wakes before its deadline. With ``grid > 0`` deadlines
  are rounded *up* to a multiple of ``grid`` seconds so that waiters due
  close together are woken in one pass; a wake-up is then at most ``grid``
  (plus the loop's own latency) after the deadline.
- Due waiters are rescheduled in deadline order, all due ones in the
  same pass (in which order trio then runs one pass's tasks is trio's
  choice: it shuffles its run queue) — or, with ``per_pass``, at most that
  many per pass, the rest in the next passes, earliest first. A loop that
  cannot keep up then serves its waiters in turn, a few milliseconds a
  pass, instead of making every pass as long as one wake-up of all of
  them (while everything else, a new connection's every step included,
  waits for each pass).
- Every wait is a checkpoint (a cancel point and a schedule point).
  Cancellation is clean: a waiter cancelled while parked is removed from
  the :class:`Lot` at once and its heap entry is marked dead (dropped
  lazily: when it reaches the top of the heap, or when dead entries
  outnumber live ones); it is never rescheduled a second time.
- Service not running: before :meth:`Timers.run` has started, a wait
  raises :class:`RuntimeError` — that is a wiring bug, and a silent
  fallback would bring back the cost this module exists to remove without
  anyone noticing. After the service has ended (shutdown: its nursery was
  cancelled), waits are served by plain trio instead, the ones parked at
  that moment included: shutdown order is not a bug, and a stream draining
  during shutdown must still be paced. ``statistics().fallbacks`` counts
  those.

Everything here runs on the trio thread; nothing is thread-safe.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from outcome import Value
from trio.lowlevel import (
    Abort,
    RaiseCancelT,
    Task,
    current_task,
    enable_ki_protection,
    reschedule,
    wait_task_rescheduled,
)

__all__ = ["Alarm", "Lot", "Timers", "TimersStatistics"]

# A heap entry is a list, so heapq compares it in C: [deadline, seq, task, lot,
# in_heap]. ``seq`` is unique, so a comparison never reaches the task. ``task``
# is None once the entry is dead (fired, cancelled, or woken through its lot).
# ``in_heap`` turns False when the entry leaves the heap; until then a dead
# entry may be revived by its :class:`Alarm` for the same deadline.
_DEADLINE, _SEQ, _TASK, _LOT, _IN_HEAP = 0, 1, 2, 3, 4
_Entry = list[Any]

#: The value a parked waiter is rescheduled with when the service stopped.
_CLOSED = object()

#: Compact the heap when it holds more than ``2 * waiters + _COMPACT_MIN`` entries
#: (then at least half are dead): O(1) amortised per wait, bounded memory.
_COMPACT_MIN = 256


@dataclass(frozen=True, slots=True)
class TimersStatistics:
    """A snapshot of a :class:`Timers` (like trio's ``MemoryChannelStatistics``)."""

    running: bool
    #: Tasks parked in :meth:`Timers.sleep_until` / :meth:`Timers.park_until` now.
    waiters: int
    #: Waiters the service woke at their deadline, since creation.
    wakeups: int
    #: Times the service woke and served the heap (wakeups / passes = batching).
    passes: int
    #: Heap entries, dead ones awaiting lazy removal included.
    heap: int
    #: Waits that ended by cancellation.
    cancelled: int
    #: Waits served by plain trio because the service had stopped.
    fallbacks: int
    grid: float


class Lot:
    """A parking lot whose waiters can also leave at a deadline.

    :meth:`park` and :meth:`unpark_all` behave as
    :class:`trio.lowlevel.ParkingLot`'s; :meth:`Timers.park_until` parks
    with a deadline as well. As with any parking lot, a woken waiter
    re-checks its own condition.
    """

    __slots__ = ("_parked",)

    def __init__(self) -> None:
        # Parked task -> its heap entry (None: parked without a deadline).
        # Insertion-ordered: unpark_all wakes in parking order.
        self._parked: dict[Task, _Entry | None] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def __repr__(self) -> str:
        return f"<Lot parked={len(self._parked)}>"

    @enable_ki_protection
    async def park(self) -> None:
        """Block until :meth:`unpark_all`. Cancellation: removed from the lot, raises."""
        task = current_task()
        parked = self._parked
        parked[task] = None

        def abort(_: RaiseCancelT) -> Abort:
            del self._parked[task]
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    @enable_ki_protection
    def unpark_all(self) -> int:
        """Wake every parked task (a waiter with a deadline returns True); how many.

        Never blocks. The woken waiters' heap entries die here, so their
        deadlines can no longer wake them.
        """
        parked = self._parked
        if not parked:
            return 0
        self._parked = {}
        for task, entry in parked.items():
            if entry is not None:
                entry[_TASK] = None
            reschedule(task, Value(True))
        return len(parked)

    @enable_ki_protection
    def unpark(self, *, count: int = 1) -> list[Task]:
        """Wake the ``count`` longest-parked tasks (as :meth:`unpark_all`); which."""
        parked = self._parked
        tasks = list(itertools.islice(parked, count))
        for task in tasks:
            entry = parked.pop(task)
            if entry is not None:
                entry[_TASK] = None
            reschedule(task, Value(True))
        return tasks


class Alarm:
    """One task's deadline, kept in the heap across its waits for the same deadline.

    A reader waits for "the next event or my heartbeat" once per event, and
    its heartbeat deadline stays the same for all the waits in between:
    passed to :meth:`Timers.park_until`, an alarm lets those waits share one
    heap entry (revived in place) instead of pushing one per wait. For one
    task's waits, one at a time.
    """

    __slots__ = ("_deadline", "_entry")

    def __init__(self) -> None:
        self._entry: _Entry | None = None
        self._deadline = math.nan


class Timers:
    """One heap of deadlines and one task that serves it (see the module docstring).

    ``grid`` (seconds, >= 0): deadlines are rounded up to a multiple of it
    so that waiters due close together wake in one pass; 0 keeps them exact.
    ``per_pass``: at most this many waiters rescheduled per pass of trio's
    loop (None: every due one).
    """

    def __init__(self, *, grid: float = 0.005, per_pass: int | None = None) -> None:
        if not grid >= 0 or math.isinf(grid):
            raise ValueError(f"grid must be a finite number >= 0, got {grid!r}")
        if per_pass is not None and per_pass < 1:
            raise ValueError(f"per_pass must be >= 1, got {per_pass!r}")
        self._grid = grid
        self._per_pass = per_pass or math.inf
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._service: Task | None = None
        self._now: Callable[[], float] = trio.current_time  # the running clock's, once served
        self._service_parked = False
        self._closed = False
        # The deadline the service is parked until (inf: the heap is empty).
        self._next = math.inf
        self._waiting = 0
        self._wakeups = 0
        self._passes = 0
        self._cancelled = 0
        self._fallbacks = 0

    def __repr__(self) -> str:
        state = "running" if self._service else "closed" if self._closed else "not started"
        return f"<Timers {state} waiters={self._waiting} heap={len(self._heap)}>"

    @property
    def grid(self) -> float:
        return self._grid

    def statistics(self) -> TimersStatistics:
        return TimersStatistics(
            running=self._service is not None,
            waiters=self._waiting,
            wakeups=self._wakeups,
            passes=self._passes,
            heap=len(self._heap),
            cancelled=self._cancelled,
            fallbacks=self._fallbacks,
            grid=self._grid,
        )

    # -- the service ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the heap until cancelled. Start it with ``await nursery.start(timers.run)``.

        Runs once per :class:`Timers` (a second call raises RuntimeError).
        Ends only by cancellation; then every waiter still parked is handed
        back to plain trio (it still wakes at its own deadline), and later
        waits are served by trio too.
        """
        if self._service is not None or self._closed:
            raise RuntimeError("Timers.run() may be started only once")
        self._service = current_task()
        # trio.current_time() in one call instead of three (read once per wait).
        self._now = trio.lowlevel.current_clock().current_time
        try:
            task_status.started()
            while True:
                if self._fire_due():
                    # More are due than one pass takes: the rest after the next pass.
                    await trio.lowlevel.checkpoint()
                    continue
                # The one trio sleep of the process: until the earliest deadline,
                # or until _push reschedules us for an earlier one.
                with trio.move_on_at(self._next):
                    self._service_parked = True
                    await wait_task_rescheduled(self._abort_service)
        finally:
            self._service = None
            self._now = trio.current_time
            self._service_parked = False
            self._closed = True
            self._release_all()

    def _abort_service(self, _: RaiseCancelT) -> Abort:
        self._service_parked = False
        return Abort.SUCCEEDED

    @enable_ki_protection
    def _fire_due(self) -> bool:
        """Reschedule the due waiters (up to ``per_pass``), drop dead entries on
        top; set ``_next``. True if due waiters were left for the next pass."""
        heap = self._heap
        now = self._now()
        fired = 0
        limit = self._per_pass
        more = False
        while heap:
            entry = heap[0]
            task = entry[_TASK]
            if task is not None:
                if entry[_DEADLINE] > now:
                    break
                if fired >= limit:
                    more = True
                    break
                # Invariant: an entry's task is cleared by exactly the one path that
                # resumes it (here, Lot.unpark_all, the abort, _release_all).
                entry[_TASK] = None
                lot = entry[_LOT]
                if lot is not None:
                    del lot._parked[task]
                reschedule(task, Value(False))
                fired += 1
            heapq.heappop(heap)[_IN_HEAP] = False
        self._wakeups += fired
        self._passes += 1
        self._next = heap[0][_DEADLINE] if heap else math.inf
        return more

    @enable_ki_protection
    def _release_all(self) -> None:
        """The service stopped: hand every parked waiter back to plain trio."""
        for entry in self._heap:
            task = entry[_TASK]
            if task is None:
                continue
            entry[_TASK] = None
            lot = entry[_LOT]
            if lot is not None:
                del lot._parked[task]
            reschedule(task, Value(_CLOSED))
        for entry in self._heap:
            entry[_IN_HEAP] = False
        self._heap.clear()
        self._next = math.inf

    # -- waiting ---------------------------------------------------------------------

    def _not_running(self) -> bool:
        """True if trio serves waits now (the service ended); raise if it never started."""
        if self._closed:
            self._fallbacks += 1
            return True
        raise RuntimeError(
            "the Timers service is not running: start it with `await nursery.start(timers.run)`"
        )

    async def sleep(self, seconds: float) -> None:
        """:meth:`sleep_until` ``trio.current_time() + seconds``."""
        await self.sleep_until(trio.current_time() + seconds)

    @enable_ki_protection
    async def sleep_until(self, deadline: float) -> None:
        """Block until ``deadline`` (trio time), rounded up to the grid.

        Always a checkpoint: a deadline already past returns after a
        schedule point. Cancellation: raises ``Cancelled``; the heap entry
        is dead and is never acted on. The waiter is woken by the service,
        not by a cancel scope of its own.
        """
        if self._service is None and self._not_running():
            await trio.sleep_until(deadline)
            return
        if deadline <= self._now():
            await trio.lowlevel.checkpoint()
            return
        entry = self._push(deadline, None)
        if await self._wait(entry) is _CLOSED:
            self._fallbacks += 1
            await trio.sleep_until(deadline)

    @enable_ki_protection
    async def park_until(self, lot: Lot, deadline: float, alarm: Alarm | None = None) -> bool:
        """Park in ``lot`` until it is unparked (True) or until ``deadline`` (False).

        Whichever comes first wakes the task, once; the other registration
        is retired without a cancel scope. A deadline already past returns
        False after a checkpoint. True may also be spurious (the service
        stopped meanwhile): as with any lot, re-check the condition.
        Cancellation: the task leaves the lot and its heap entry dies; raises.
        ``alarm``: the task's :class:`Alarm`; waits for the same deadline
        share its heap entry.
        """
        if self._service is None and self._not_running():
            with trio.move_on_at(deadline):
                await lot.park()
                return True
            return False
        if deadline <= self._now():
            await trio.lowlevel.checkpoint()
            return False
        kept = alarm._entry if alarm is not None and alarm._deadline == deadline else None
        if kept is not None and kept[_IN_HEAP]:
            # Still in the heap, dead since the last wake-up: revive it in place.
            # Its deadline is where it was, so the service's next wake-up covers it.
            kept[_TASK] = current_task()
            kept[_LOT] = lot
            entry = kept
        else:
            entry = self._push(deadline, lot)
            if alarm is not None:
                alarm._entry, alarm._deadline = entry, deadline
        lot._parked[entry[_TASK]] = entry
        return await self._wait(entry) is not False

    def _push(self, deadline: float, lot: Lot | None) -> _Entry:
        grid = self._grid
        if grid and deadline < math.inf:
            rounded = math.ceil(deadline / grid) * grid
            deadline = rounded if rounded >= deadline else deadline  # never early
        elif deadline != deadline:
            raise ValueError("deadline must not be NaN")
        heap = self._heap
        if len(heap) > 2 * self._waiting + _COMPACT_MIN:
            # Mostly dead entries (waits retired early by cancellation or their lot).
            kept = []
            for e in heap:
                if e[_TASK] is not None:
                    kept.append(e)
                else:
                    e[_IN_HEAP] = False
            heap[:] = kept
            heapq.heapify(heap)
        entry = [deadline, next(self._seq), current_task(), lot, True]
        heapq.heappush(heap, entry)
        if deadline < self._next:
            # The service sleeps until later: wake it to sleep until this one.
            self._next = deadline
            if self._service_parked:
                self._service_parked = False
                assert self._service is not None
                reschedule(self._service)
        return entry

    async def _wait(self, entry: _Entry) -> Any:
        """Park the current task for ``entry``; what it was rescheduled with."""

        def abort(_: RaiseCancelT) -> Abort:
            # Still parked (trio calls this at most once, and never after a
            # reschedule): retire the entry so nothing wakes this task again.
            task = entry[_TASK]
            entry[_TASK] = None
            lot = entry[_LOT]
            if lot is not None:
                del lot._parked[task]
            self._cancelled += 1
            return Abort.SUCCEEDED

        self._waiting += 1
        try:
            return await wait_task_rescheduled(abort)
        finally:
            self._waiting -= 1
