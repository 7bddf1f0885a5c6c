"""FanOut: the readers a publish wakes, at most so many per scheduler pass.

trio runs everything runnable in one pass before it looks at the clock and
the sockets again. A publish on a stream with 1,000 observers made 1,000
tasks runnable at once, so the next pass took as long as 1,000 socket
writes (~70 ms here), and every other task waited for it: the stream's own
producer (its client's lateness), the timer service, a supervisor's join,
any new request. With a :class:`FanOut`, a lot with more parked readers
than ``per_pass`` is woken ``per_pass`` readers at a time, one slice per
pass, the lots in turn; a pass stays a few milliseconds long whatever the
number of observers. The observers still get everything (a woken reader
takes all it has not read, so a later wake-up carries more at once: they
coalesce, as the design says), and a lot with few readers is woken at once,
as without a FanOut.

Who is owed a wake-up: every reader parked when the stream published (it
had read everything before it parked). Readers park in order, so they are
the first ``len(lot)`` of the lot at that moment; one woken early (a
heartbeat) or twice costs a spurious wake-up, which a reader survives (it
re-checks and parks again).
"""

from __future__ import annotations

from typing import NoReturn, Protocol

import trio


class Unparkable(Protocol):
    """A parking lot that can wake its longest-parked tasks first
    (:class:`trio.lowlevel.ParkingLot`, ``server.timers.Lot``)."""

    def __len__(self) -> int: ...

    def unpark_all(self) -> object: ...

    def unpark(self, *, count: int) -> list[object]: ...


class FanOut:
    """Wakes readers in slices of ``per_pass``; start :meth:`run` in a nursery.

    Until :meth:`run` runs (and after it ends), :meth:`wake` wakes every
    parked reader at once.
    """

    def __init__(self, per_pass: int = 64) -> None:
        if per_pass < 1:
            raise ValueError(f"per_pass must be >= 1, not {per_pass}")
        self._per_pass = per_pass
        # Lot -> readers still owed a wake-up, in turn order (dicts keep insertion order).
        self._owed: dict[Unparkable, int] = {}
        self._idle = trio.lowlevel.ParkingLot()
        self._running = False

    @property
    def backlog(self) -> int:
        """Readers owed a wake-up, not woken yet."""
        return sum(self._owed.values())

    def wake(self, lot: Unparkable) -> None:
        """Every reader parked on ``lot`` now gets a wake-up: now, or in the next passes."""
        parked = len(lot)
        if not parked:
            return
        if not self._running or (parked <= self._per_pass and not self._owed):
            lot.unpark_all()
            return
        self._owed[lot] = parked  # a lot already owed keeps its turn
        if self._idle:
            self._idle.unpark_all()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Wake what is owed, ``per_pass`` readers per scheduler pass; runs until cancelled.

        At most one ``run()`` per FanOut. When it ends, everything still
        owed is woken at once.
        """
        if self._running:
            raise RuntimeError("FanOut.run() is already running")
        self._running = True
        owed = self._owed
        try:
            task_status.started()
            while True:
                if not owed:
                    await self._idle.park()
                    continue
                budget = self._per_pass
                while budget and owed:
                    lot = next(iter(owed))
                    due = owed.pop(lot)
                    take = min(due, budget)
                    budget -= take
                    if len(lot.unpark(count=take)) == take and due > take:
                        owed[lot] = due - take  # the rest in a later pass, after the other lots
                # The woken run in the next pass, and so do we.
                await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            lots, self._owed = list(owed), {}
            for lot in lots:
                lot.unpark_all()
