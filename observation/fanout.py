"""FanOut: at most so many readers of the streams get to run per scheduler pass.

trio runs everything runnable in one pass before it looks at the clock and
the sockets again. 1,000 observers of one stream made every pass as long
as 1,000 socket writes (~70 ms here): a publish woke them all at once, and
an observer that had fallen behind never parked at all (it took its next
batch and yielded straight back onto the run queue). Every other task
waited for those passes: the stream's own producer (its client's
lateness), the timer service, a supervisor's join, any new request.

With a :class:`FanOut`, readers are let through ``per_pass`` per pass:

- :meth:`wake` (a publish, a close): a lot's parked readers are woken at
  once while this pass has room for all of them, else the rest are owed
  and woken a slice per pass, the lots in turn;
- :meth:`turn` (an observer that has more to read at once): it runs again
  in the next pass if that pass has room, else it waits in line.

Observers still get everything: a reader let through later takes all it
has not read, so its writes carry more events at once (they coalesce, as
the design says). A pass ends when trio waits for I/O (an ``Instrument``'s
``before_io_wait``), which is where the count starts again.

Who is owed a wake-up: every reader parked on the lot when it was woken
(it had read everything before it parked). Readers park in order, so they
are the first ``len(lot)`` of the lot at that moment; one woken early (a
heartbeat) or twice costs a spurious wake-up, which a reader survives (it
re-checks and parks again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn, Protocol

import trio


class Unparkable(Protocol):
    """A parking lot that can wake its longest-parked tasks first
    (:class:`trio.lowlevel.ParkingLot`, ``server.timers.Lot``)."""

    def __len__(self) -> int: ...

    def unpark_all(self) -> object: ...

    def unpark(self, *, count: int) -> Sequence[object]: ...


class _PassEnd(trio.abc.Instrument):
    """Tells the fan-out that a scheduler pass ended (trio is about to wait for I/O)."""

    def __init__(self, fanout: FanOut) -> None:
        self._fanout = fanout

    def before_io_wait(self, timeout: float) -> None:
        self._fanout._granted = 0


class FanOut:
    """Lets readers run ``per_pass`` per scheduler pass; start :meth:`run` in a nursery.

    Until :meth:`run` runs (and after it ends), :meth:`wake` wakes every
    parked reader at once and :meth:`turn` is a plain checkpoint.
    """

    def __init__(self, per_pass: int = 64) -> None:
        if per_pass < 1:
            raise ValueError(f"per_pass must be >= 1, not {per_pass}")
        self._per_pass = per_pass
        #: Readers let through in this pass (reset when the pass ends).
        self._granted = 0
        # Lot -> readers still owed a wake-up, in turn order (dicts keep insertion order).
        self._owed: dict[Unparkable, int] = {}
        # Readers with more to read at once, in line for a pass with room.
        self._line = trio.lowlevel.ParkingLot()
        self._idle = trio.lowlevel.ParkingLot()
        self._running = False

    @property
    def backlog(self) -> int:
        """Readers owed a wake-up or in line, not let through yet."""
        return sum(self._owed.values())

    def wake(self, lot: Unparkable) -> None:
        """Every reader parked on ``lot`` now gets a wake-up: now, or in the next passes."""
        parked = len(lot)
        if not parked:
            return
        if not self._running:
            lot.unpark_all()
        elif not self._owed and self._granted + parked <= self._per_pass:
            self._granted += parked
            lot.unpark_all()
        else:
            self._owed[lot] = parked  # a lot already owed keeps its turn
            self._kick()

    async def turn(self) -> None:
        """A schedule point for a reader with more to read: at once if this pass has
        room, else in line (cancellable either way)."""
        if not self._running or (not self._owed and self._granted < self._per_pass):
            self._granted += 1
            await trio.lowlevel.checkpoint()
            return
        self._owed[self._line] = len(self._line) + 1  # this task, parked just below
        self._kick()
        await self._line.park()

    def _kick(self) -> None:
        if self._idle:
            self._idle.unpark_all()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Let through what is owed, as each pass has room; runs until cancelled.

        At most one ``run()`` per FanOut. When it ends, everything still
        owed is woken at once.
        """
        if self._running:
            raise RuntimeError("FanOut.run() is already running")
        pass_end = _PassEnd(self)
        trio.lowlevel.add_instrument(pass_end)
        self._running = True
        owed = self._owed
        try:
            task_status.started()
            while True:
                if not owed:
                    await self._idle.park()
                    continue
                room = self._per_pass - self._granted
                while room > 0 and owed:
                    lot = next(iter(owed))
                    due = owed.pop(lot)
                    take = min(due, room)
                    woken = len(lot.unpark(count=take))
                    self._granted += woken
                    room -= take
                    if woken == take and due > take:
                        owed[lot] = due - take  # the rest in a later pass, after the other lots
                # The let-through run in the next pass, and so do we.
                await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            trio.lowlevel.remove_instrument(pass_end)
            lots, self._owed = list(owed), {}
            for lot in lots:
                lot.unpark_all()
