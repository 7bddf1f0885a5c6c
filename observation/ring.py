"""A bounded ring of events addressed by id.

Pure data structure: no trio, no waking. The stream owns one.

The ring holds each event as a plain tuple of its fields (all but the id,
which is where it is held), not as the :class:`Event` itself: a tuple of
strings and bytes is dropped from the cyclic garbage collector's lists the
first time it survives a collection, an instance of a class never is. A
ring holds thousands of events that live as long as the stream, and as
instances they were ~90% of what every collection of the older generations
had to walk: at 500 streams x 20/s, pauses of 30-100 ms, the streams'
lateness maximum (BENCHMARKS.md). Events are built again, on demand, by
:meth:`Ring.events` from what :meth:`Ring.held` returned (a stream's batch
does so only when a reader asks for its events); :meth:`Ring.slice` does
both at once. Given a ``decode`` (the inverse of the stream's
encoder), the ring keeps an event's wire bytes but not its data, which is
in them: a third less memory an event.
"""

from __future__ import annotations

from collections.abc import Callable

from .events import Event

#: Gets an event's ``data`` back from its id, name and wire bytes (see Ring).
Decode = Callable[[int, str, bytes], str]

#: How the ring keeps an event: its fields but the id (known from where it is
#: held), and with a ``decode``, without ``data`` (None) either.
_Fields = tuple[str, str | None, bytes]


class Ring:
    """The newest ``size`` events of a stream, addressed by their ids.

    Ids are consecutive, so no search is ever needed: the event with id
    ``i`` lives at ``buffer[(i - base) % size]``, where ``base`` is the id
    stored at index 0 when the buffer started filling. The buffer grows up
    to ``size`` (a short stream never allocates the whole ring), then
    wraps, overwriting the oldest slot.

    Invariants:
      * ``first_id <= last_id + 1``; the ring is empty iff they are equal+1.
      * ``len(self) == last_id - first_id + 1 <= size``.
      * ids ``first_id..last_id`` are all present; nothing older is.
    """

    __slots__ = ("_base", "_buffer", "_decode", "_size", "first_id", "last_id")

    def __init__(self, size: int, decode: Decode | None = None) -> None:
        if size < 1:
            raise ValueError(f"ring size must be >= 1, not {size}")
        self._size = size
        # With a decode, an event's data is not kept: it is in its wire bytes.
        self._decode = decode
        self._buffer: list[_Fields] = []
        self._base = 1
        #: Id of the newest event ever appended (0 before any). Read-only for
        #: everyone else: an attribute, as readers check it twice per event.
        self.last_id = 0
        #: Id of the oldest event still held (``last_id + 1`` when empty).
        #: Read-only for everyone else, kept by :meth:`append` and
        #: :meth:`release`: every reader's take reads it.
        self.first_id = 1

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._buffer)

    def is_full(self) -> bool:
        return len(self._buffer) == self._size

    def append(self, event: Event) -> None:
        """Add the next event; when full, the oldest one is dropped."""
        if event.id != self.last_id + 1:
            raise ValueError(f"expected id {self.last_id + 1}, got {event.id}")
        fields = (event.name, None if self._decode else event.data, event.wire)
        if len(self._buffer) < self._size:
            self._buffer.append(fields)
        else:
            self._buffer[(event.id - self._base) % self._size] = fields
            self.first_id += 1
        self.last_id = event.id

    def slice(self, first: int, last: int) -> tuple[Event, ...]:
        """The events with ids ``first..last`` inclusive, in order.

        Both ids must be held (``first_id <= first <= last <= last_id``).
        Costs O(last - first): two list slices at most, and an Event built
        per event (equal to the one appended, not the same object).
        """
        return self.events(first, self.held(first, last))

    def held(self, first: int, last: int) -> list[_Fields]:
        """How events ``first..last`` are held (see :meth:`slice`), for
        :meth:`events` later: what is held is immutable, so the answer stays
        true when the ring has moved on."""
        if not (self.first_id <= first <= last <= self.last_id):
            raise IndexError(f"ids {first}..{last} not in ring {self.first_id}..{self.last_id}")
        start = (first - self._base) % self._size
        stop = (last - self._base) % self._size + 1
        buffer = self._buffer
        return buffer[start:stop] if start < stop else buffer[start:] + buffer[:stop]

    def events(self, first: int, held: list[_Fields]) -> tuple[Event, ...]:
        """The events ``held`` (:meth:`held`), the first of them ``first``."""
        decode = self._decode
        if decode is None:
            return tuple([Event(i, *fields) for i, fields in enumerate(held, first)])  # type: ignore[arg-type]
        return tuple(
            [
                Event(i, name, decode(i, name, wire), wire)
                for i, (name, _, wire) in enumerate(held, first)
            ]
        )

    def release(self, keep: int = 0) -> None:
        """Drop every event but the newest ``keep`` (the memory goes with them);
        ids keep counting."""
        keep = min(keep, len(self._buffer))
        first = self.last_id - keep + 1
        self._buffer = self.held(first, self.last_id) if keep else []
        self._base = self.first_id = first
