"""Task steps per pass of trio's run loop, for tests of what one pass may hold.

trio runs every runnable task once per pass, then waits for I/O (where
``before_io_wait`` is called); the steps counted between two of those are one
pass's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.lowlevel


class StepsPerPass(trio.abc.Instrument):
    """Steps of the tasks whose name starts with ``prefix``, one count per pass."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.steps: list[int] = [0]

    def before_io_wait(self, timeout: float) -> None:
        if self.steps[-1]:
            self.steps.append(0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith(self.prefix):
            self.steps[-1] += 1


@contextmanager
def steps_per_pass(prefix: str) -> Iterator[StepsPerPass]:
    """Count while the block runs (only passes that ran such a task are kept)."""
    instrument = StepsPerPass(prefix)
    trio.lowlevel.add_instrument(instrument)
    try:
        yield instrument
    finally:
        trio.lowlevel.remove_instrument(instrument)
