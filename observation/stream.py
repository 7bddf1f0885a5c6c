"""One stream: a ring of events, one producer, any number of reader cursors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .events import Batch, Event
from .reader import Reader
from .ring import Decode, Ring
from .stats import Tally

if TYPE_CHECKING:
    from .fanout import FanOut

Encode = Callable[[int, str, str], bytes]


class WakeupLot(Protocol):
    """Where a stream's waiting readers park: :class:`trio.lowlevel.ParkingLot`,
    or any lot with the same methods (one whose waiters may also leave
    at a deadline lets a reader wait for "the next event or my heartbeat"
    without a cancel scope per wait: see :meth:`Reader.next_batch_or`)."""

    def park(self) -> Awaitable[None]: ...

    def unpark_all(self) -> object: ...

    def unpark(self, *, count: int) -> list[Any]: ...

    def __len__(self) -> int: ...


WakeupLotFactory = Callable[[], WakeupLot]


class Stream:
    """The events of one streamed model response, readable by cursors.

    Created only by :meth:`ObservationManager.open_stream`. One producer
    publishes; readers attach with :meth:`reader`. Waking is one
    :class:`trio.lowlevel.ParkingLot` per stream: a publish unparks every
    waiting reader at once, and each woken reader takes everything between
    its cursor and the head in one :class:`Batch`.

    The *primary* reader (the stream's own client) is never skipped: when
    it is a whole ring behind, :meth:`publish_nowait` raises
    :class:`trio.WouldBlock` and :meth:`publish` waits. Observers never slow
    the producer; they are skipped forward instead.

    Usable as a sync context manager: leaving the ``with`` block closes it.
    """

    __slots__ = (
        "__weakref__",
        "_cached",
        "_encode",
        "_ended_at",
        "_ending",
        "_fanout",
        "_observers",
        "_on_close",
        "_primary",
        "_producer_waits",
        "_ring",
        "_space",
        "_tally",
        "_wakeup",
        "group",
        "info",
        "stream_id",
    )

    def __init__(
        self,
        stream_id: str,
        *,
        group: str,
        info: object,
        ring_size: int,
        encode: Encode,
        decode: Decode | None = None,
        tally: Tally,
        on_close: Callable[[Stream], None],
        wakeup_lot: WakeupLotFactory = trio.lowlevel.ParkingLot,
        fanout: FanOut | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.group = group
        self.info = info
        self._ring = Ring(ring_size, decode)
        self._encode = encode
        self._tally = tally
        self._on_close = on_close
        self._ended_at: float | None = None
        self._ending = 0  # the newest events that outlive the ring's release
        self._primary: Reader | None = None
        self._observers = 0
        # Readers waiting for the next event (or the end) park here
        # (Reader.next_batch parks on it directly: it is the hot path).
        self._wakeup = wakeup_lot()
        self._fanout = fanout
        # The producer waiting for the primary reader to make room parks here
        # (and says so: the primary's every take checks, so no lot method call).
        self._space = trio.lowlevel.ParkingLot()
        self._producer_waits = False
        # The last batch built: readers woken by the same publish ask for the
        # same id range, so they share one tuple and one joined bytes object.
        # Always valid: ids are never reused and events are immutable.
        self._cached: Batch | None = None

    def __repr__(self) -> str:
        state = "ended" if self.ended else "live"
        return f"<Stream {self.stream_id!r} group={self.group!r} last_id={self.last_id} {state}>"

    # -- state -------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """Id of the newest event (0 before any)."""
        return self._ring.last_id

    @property
    def first_id(self) -> int:
        """Id of the oldest buffered event (``last_id + 1`` when none)."""
        return self._ring.first_id

    @property
    def buffered(self) -> int:
        """How many events the ring holds now."""
        return len(self._ring)

    @property
    def ended(self) -> bool:
        return self._ended_at is not None

    @property
    def ended_at(self) -> float | None:
        """``trio.current_time()`` when :meth:`close` was first called, else None."""
        return self._ended_at

    @property
    def observers(self) -> int:
        """Non-primary readers attached now."""
        return self._observers

    @property
    def primary_attached(self) -> bool:
        return self._primary is not None

    # -- producing ---------------------------------------------------------

    def publish_nowait(self, name: str, data: str) -> Event:
        """Append the next event and wake every waiting reader. Never waits.

        Raises :class:`trio.WouldBlock` (and appends nothing) if a primary
        reader is attached and has not read the event that appending would
        drop. Raises :class:`trio.ClosedResourceError` after :meth:`close`.
        ``encode`` runs exactly once per event; if it raises, nothing is
        appended and the id is not used.
        """
        if self._ended_at is not None:
            raise trio.ClosedResourceError(f"stream {self.stream_id!r} is closed")
        ring = self._ring
        primary = self._primary
        # Appending to a full ring drops first_id; the primary must have it. It
        # has not if it is a whole ring behind (only a full ring can be: ids
        # start at 1, and a released ring belongs to a closed stream).
        if primary is not None and ring.last_id - primary._position >= ring.size:
            raise trio.WouldBlock
        event_id = ring.last_id + 1
        event = Event(event_id, name, data, self._encode(event_id, name, data))
        ring.append(event)
        # The batch a reader that is up to date will ask for: just this event.
        self._cached = Batch((event,), 0, event.wire)
        # Wake the readers parked on the lot, if any can be: observers, or a
        # primary reader waiting in next_batch (the stream's own client is
        # written by its producer instead, server.push, and never parks here).
        # Asking these two, not the lot (a Python __len__), is per event.
        if self._observers or (primary is not None and primary._receiving):
            self._wake_readers()
        return event

    async def publish(self, name: str, data: str) -> Event:
        """Append the next event, waiting while the primary reader is a whole ring behind.

        Always a checkpoint. Only the primary reader can make this wait;
        observers never do. Cancellation is atomic: if cancelled, nothing
        was appended. Raises :class:`trio.ClosedResourceError` if the stream
        is (or becomes, while waiting) closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            event = self.publish_nowait(name, data)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return event
        while True:
            # Unparked when the primary reads, detaches, or the stream closes.
            self._producer_waits = True
            try:
                await self._space.park()
            finally:
                self._producer_waits = False
            try:
                return self.publish_nowait(name, data)
            except trio.WouldBlock:
                continue

    def close(self, ending: int = 1) -> None:
        """Mark the stream ended. Idempotent; never blocks.

        Readers drain what is buffered, then their iteration ends. A producer
        waiting in :meth:`publish` gets :class:`trio.ClosedResourceError`.
        The manager's linger clock starts now.

        ``ending``: how many of the newest events say how the stream ended
        (a ``done``, and an ``error`` before it): they outlive the ring's
        release at expiry, so a reader that comes, or is still behind, after
        the linger still learns the ending (after ``lagged``), as every
        observer's feed ends with it.
        """
        if self._ended_at is not None:
            return
        self._ending = ending
        self._ended_at = trio.current_time()
        self._wake_readers()
        self._space.unpark_all()
        self._on_close(self)

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading -----------------------------------------------------------

    def reader(self, after_id: int = 0, *, primary: bool = False) -> Reader:
        """A cursor over this stream, attached while its ``with`` block runs.

        ``after_id`` is the last id the caller already has: 0 replays from
        the oldest buffered event, ``>= last_id`` replays nothing and
        continues live. Attaching after :meth:`close` replays what is left
        and then ends. At most one primary reader at a time: entering a
        second raises :class:`trio.BusyResourceError`.
        """
        if after_id < 0:
            raise ValueError(f"after_id must be >= 0, not {after_id}")
        return Reader(self, after_id, primary=primary)

    # The methods below are the Reader's private interface to its stream.

    def _attach(self, reader: Reader) -> None:
        if reader.primary:
            if self._primary is not None:
                raise trio.BusyResourceError(
                    f"stream {self.stream_id!r} already has a primary reader"
                )
            self._primary = reader
        else:
            self._observers += 1
        self._tally.attached(primary=reader.primary)

    def _detach(self, reader: Reader) -> None:
        if reader.primary:
            self._primary = None
            # A producer waiting on this reader is free to go.
            self._space.unpark_all()
        else:
            self._observers -= 1
        self._tally.detached(primary=reader.primary)

    def _wake_readers(self) -> None:
        """Every parked reader has something new: wake them (through the fan-out, if any)."""
        if self._fanout is None:
            self._wakeup.unpark_all()
        else:
            self._fanout.wake(self._wakeup)

    def _lagged(self, skipped: int) -> None:
        self._tally.lagged(skipped)

    def _batch(self, first: int, last: int, skipped: int) -> Batch:
        """Events ``first..last`` (inclusive, all buffered) as one Batch."""
        cached = self._cached
        if cached is None or cached.first_id != first or cached.last_id != last:
            # The wire bytes now; the Events only if a reader asks for them.
            ring = self._ring
            held = ring.held(first, last)
            cached = Batch.lazy(
                first,
                last,
                0,
                b"".join(held.wires),
                partial(ring.events, first, held),
            )
            self._cached = cached
        if skipped:
            return cached.with_skipped(skipped)
        return cached

    def _release(self) -> None:
        """Free the ring but its ending (called by the manager at expiry).

        Readers still attached are told the rest as skipped, then given the
        ending, then end.
        """
        self._ring.release(self._ending)
        self._cached = None
        self._wake_readers()
