"""Immutable values handed out by a stream: one Event, one Batch of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True, unsafe_hash=True)
class Event:
    """One published event.

    ``id`` is the per-stream sequence number (1, 2, 3, ... with no gaps).
    ``wire`` is the event already encoded for the wire (SSE bytes): the
    manager's ``encode`` ran exactly once, at publish, and every reader
    shares these bytes.

    Immutable by convention, as :class:`Batch` (nothing sets a field after
    ``__init__``; it hashes by value): one is built per event published,
    and ``frozen=True`` sets each field through ``object.__setattr__``,
    ~430 ns a construction against ~110 ns (issue 10, session 13).
    """

    id: int
    name: str
    data: str
    wire: bytes


class Batch:
    """Everything one reader takes on one wake-up.

    ``events`` are consecutive ids in order. ``skipped`` > 0 means the
    reader fell more than the ring behind and this many events were dropped
    *just before* ``events[0]`` (``events`` may then be empty only when the
    stream's ring was released at expiry). ``wire`` is the concatenation of
    the events' wire bytes: one write per wake-up.

    Immutable by convention (nothing sets an attribute after ``__init__``).
    A batch sliced from the ring (:meth:`lazy`) builds its events only when
    ``events`` is first read: an SSE reader (the stream's own client, an SSE
    observer) writes ``wire`` and never needs them.
    """

    __slots__ = ("_events", "_make", "first_id", "last_id", "skipped", "wire")

    def __init__(self, events: tuple[Event, ...], skipped: int, wire: bytes) -> None:
        self._events: tuple[Event, ...] | None = events
        self._make: Callable[[], tuple[Event, ...]] | None = None
        self.skipped = skipped
        self.wire = wire
        #: The ids of the first and the last event (0 and -1 when there is none).
        self.first_id = events[0].id if events else 0
        self.last_id = events[-1].id if events else -1

    @classmethod
    def lazy(
        cls,
        first_id: int,
        last_id: int,
        skipped: int,
        wire: bytes,
        make: Callable[[], tuple[Event, ...]],
    ) -> Batch:
        """Events ``first_id..last_id`` (at least one), built by ``make()`` when first read."""
        batch = cls.__new__(cls)
        batch._events, batch._make = None, make
        batch.skipped, batch.wire = skipped, wire
        batch.first_id, batch.last_id = first_id, last_id
        return batch

    def with_skipped(self, skipped: int) -> Batch:
        """The same events, after ``skipped`` dropped ones."""
        if self._events is not None:
            return Batch(self._events, skipped, self.wire)
        assert self._make is not None
        return Batch.lazy(self.first_id, self.last_id, skipped, self.wire, self._make)

    @property
    def events(self) -> tuple[Event, ...]:
        events = self._events
        if events is None:
            assert self._make is not None
            events = self._events = self._make()
            self._make = None
        return events

    def __repr__(self) -> str:
        return f"Batch(ids {self.first_id}..{self.last_id}, skipped={self.skipped})"
