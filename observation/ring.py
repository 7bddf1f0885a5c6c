"""A bounded ring of events addressed by id.

Pure data structure: no trio, no waking. The stream owns one.

The ring keeps each event's fields (all but the id, which is where it is
held) in parallel lists, one per field, not as the :class:`Event` itself:
nothing is allocated per event but what the event is made of (its wire
bytes), and the cyclic garbage collector has nothing to walk (lists of
strings and bytes are all it sees; instances of a class were ~90% of what
every collection of the older generations had to walk: at 500 streams x
20/s, pauses of 30-100 ms, the streams' lateness maximum; a tuple per event,
the next design, was still one tracked allocation per event, and one cold
object more per publish at 250 streams: BENCHMARKS.md). Events are built
again, on demand, by :meth:`Ring.events` from what :meth:`Ring.held`
returned (a stream's batch does so only when a reader asks for its events);
:meth:`Ring.slice` does both at once. Given a ``decode`` (the inverse of the
stream's encoder), the ring keeps an event's wire bytes but not its data,
which is in them: a third less memory an event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .events import Event

#: Gets an event's ``data`` back from its id, name and wire bytes (see Ring).
Decode = Callable[[int, str, bytes], str]


class Held(NamedTuple):
    """Events ``first..last`` as the ring holds them (:meth:`Ring.held`): each
    field's values in id order; ``datas`` is None for a ring with a ``decode``."""

    names: list[str]
    datas: list[str] | None
    wires: list[bytes]


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

    __slots__ = ("_base", "_datas", "_decode", "_names", "_wires", "first_id", "last_id", "size")

    def __init__(self, size: int, decode: Decode | None = None) -> None:
        if size < 1:
            raise ValueError(f"ring size must be >= 1, not {size}")
        #: How many events it holds at most. Read-only for everyone else (an
        #: attribute: a publish checks the primary reader against it).
        self.size = size
        # With a decode, an event's data is not kept: it is in its wire bytes.
        self._decode = decode
        # One list per field, index i holding the event with id base + i (mod size).
        self._names: list[str] = []
        self._datas: list[str] | None = None if decode is not None else []
        self._wires: list[bytes] = []
        self._base = 1
        #: Id of the newest event ever appended (0 before any). Read-only for
        #: everyone else: an attribute, as readers check it twice per event.
        self.last_id = 0
        #: Id of the oldest event still held (``last_id + 1`` when empty).
        #: Read-only for everyone else, kept by :meth:`append` and
        #: :meth:`release`: every reader's take reads it.
        self.first_id = 1

    def __len__(self) -> int:
        return len(self._wires)

    def append(self, event: Event) -> None:
        """Add the next event; when full, the oldest one is dropped."""
        event_id = event.id
        if event_id != self.last_id + 1:
            raise ValueError(f"expected id {self.last_id + 1}, got {event_id}")
        wires, datas = self._wires, self._datas
        if len(wires) < self.size:
            self._names.append(event.name)
            wires.append(event.wire)
            if datas is not None:
                datas.append(event.data)
        else:
            i = (event_id - self._base) % self.size
            self._names[i] = event.name
            wires[i] = event.wire
            if datas is not None:
                datas[i] = event.data
            self.first_id += 1
        self.last_id = event_id

    def slice(self, first: int, last: int) -> tuple[Event, ...]:
        """The events with ids ``first..last`` inclusive, in order.

        Both ids must be held (``first_id <= first <= last <= last_id``).
        Costs O(last - first): two list slices per field at most, and an
        Event built per event (equal to the one appended, not the same object).
        """
        return self.events(first, self.held(first, last))

    def held(self, first: int, last: int) -> Held:
        """How events ``first..last`` are held (see :meth:`slice`), for
        :meth:`events` later: copies of the lists' slices, so the answer
        stays true when the ring has moved on."""
        if not (self.first_id <= first <= last <= self.last_id):
            raise IndexError(f"ids {first}..{last} not in ring {self.first_id}..{self.last_id}")
        start = (first - self._base) % self.size
        stop = (last - self._base) % self.size + 1
        datas = self._datas
        if start < stop:
            return Held(
                self._names[start:stop],
                None if datas is None else datas[start:stop],
                self._wires[start:stop],
            )
        return Held(
            self._names[start:] + self._names[:stop],
            None if datas is None else datas[start:] + datas[:stop],
            self._wires[start:] + self._wires[:stop],
        )

    def events(self, first: int, held: Held) -> tuple[Event, ...]:
        """The events ``held`` (:meth:`held`), the first of them ``first``."""
        names, datas, wires = held
        ids = range(first, first + len(wires))
        if datas is None:
            decode = self._decode
            assert decode is not None
            datas = [decode(i, name, wire) for i, name, wire in zip(ids, names, wires, strict=True)]
        return tuple(map(Event, ids, names, datas, wires))

    def release(self, keep: int = 0) -> None:
        """Drop every event but the newest ``keep`` (the memory goes with them);
        ids keep counting."""
        keep = min(keep, len(self._wires))
        first = self.last_id - keep + 1
        names, datas, wires = self.held(first, self.last_id) if keep else ([], None, [])
        self._names, self._wires = names, wires
        if self._datas is not None:
            self._datas = datas if datas is not None else []
        self._base = self.first_id = first
