"""Statistics: the frozen snapshot and the live counters behind it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ObservationStatistics:
    """A snapshot of an ObservationManager, like trio's MemoryChannelStatistics.

    streams_live       streams opened and not yet closed
    streams_lingering  closed streams still readable (within linger)
    readers            readers attached now (primary and observers)
    observers          non-primary readers attached now
    events_buffered    events held in the rings of live and lingering streams
    lagged_total       events ever reported as ``skipped`` to readers
    peak_readers       the most readers ever attached at once
    waiters            tasks blocked in wait_for_stream()
    """

    streams_live: int
    streams_lingering: int
    readers: int
    observers: int
    events_buffered: int
    lagged_total: int
    peak_readers: int
    waiters: int


class Tally:
    """Manager-wide counters that streams and readers update in place.

    Invariant: ``readers == primaries + observers`` and ``readers <= peak_readers``.
    """

    __slots__ = ("lagged_total", "observers", "peak_readers", "readers")

    def __init__(self) -> None:
        self.readers = 0
        self.observers = 0
        self.peak_readers = 0
        self.lagged_total = 0

    def attached(self, *, primary: bool) -> None:
        self.readers += 1
        if not primary:
            self.observers += 1
        self.peak_readers = max(self.peak_readers, self.readers)

    def detached(self, *, primary: bool) -> None:
        self.readers -= 1
        if not primary:
            self.observers -= 1

    def lagged(self, skipped: int) -> None:
        self.lagged_total += skipped
