"""The ObservationManager: every live or lingering stream, by id and by group."""

from __future__ import annotations

import math
from collections import deque
from typing import NoReturn

import trio

from .errors import StreamExists
from .fanout import FanOut
from .ring import Decode
from .stats import ObservationStatistics, Tally
from .stream import Encode, Stream, WakeupLotFactory


class _Arrival:
    """Tasks waiting for the next stream of one group, and what they get."""

    __slots__ = ("event", "stream", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.stream: Stream | None = None
        self.waiters = 0


class ObservationManager:
    """One bounded ring of events per live (or recently ended) stream.

    Streams are registered by id and grouped by chat session (``group``).
    A closed stream stays readable for ``linger`` seconds, then it is
    forgotten and its ring released. Expiry is enforced two ways: every
    lookup treats an expired stream as gone (and frees it) even if
    :meth:`run` has not swept yet, and :meth:`run` frees streams when their
    linger passes so memory does not wait for a lookup.

    Everything here is synchronous except :meth:`wait_for_stream` and
    :meth:`run`, the only things that can block. Times are trio's clock, so
    all methods must be called from inside ``trio.run``.

    ``encode(id, name, data)`` makes an event's wire bytes, once, at
    publish. ``decode(id, name, wire)``, if given, is its inverse for
    ``data``: the rings then keep the wire bytes only, and an event's data
    is read back from them when a batch is sliced from the ring.
    """

    def __init__(
        self,
        *,
        ring_size: int = 4096,
        linger: float = 30.0,
        encode: Encode,
        decode: Decode | None = None,
        wakeup_lot: WakeupLotFactory = trio.lowlevel.ParkingLot,
        fanout: FanOut | None = None,
    ) -> None:
        if ring_size < 1:
            raise ValueError(f"ring_size must be >= 1, not {ring_size}")
        if not linger >= 0:
            raise ValueError(f"linger must be >= 0, not {linger}")
        self._ring_size = ring_size
        self._linger = linger
        self._encode = encode
        self._decode = decode
        self._wakeup_lot = wakeup_lot
        self._fanout = fanout
        self._tally = Tally()
        # Every registered stream (live or lingering), in open order.
        self._streams: dict[str, Stream] = {}
        # Per group, its registered streams in open order (newest last).
        # Invariant: a group key exists iff its list is non-empty.
        self._groups: dict[str, list[Stream]] = {}
        # Closed streams in close order. close() stamps trio.current_time(),
        # which never decreases, and linger is constant: so this is also
        # expiry order and the head is always the next to expire.
        self._lingering: deque[Stream] = deque()
        # Groups with tasks in wait_for_stream(); an entry exists iff waiters > 0.
        self._arrivals: dict[str, _Arrival] = {}
        # run() parks here when nothing lingers; close() wakes it.
        self._sweeper = trio.lowlevel.ParkingLot()
        self._running = False

    # -- streams -----------------------------------------------------------

    def open_stream(self, stream_id: str, *, group: str, info: object = None) -> Stream:
        """Register a new live stream and wake ``wait_for_stream(group)`` waiters.

        ``info`` is opaque to the manager. Raises :class:`StreamExists` if
        ``stream_id`` is live or lingering (an expired id may be reused).
        """
        self._sweep()
        if stream_id in self._streams:
            raise StreamExists(stream_id)
        stream = Stream(
            stream_id,
            group=group,
            info=info,
            ring_size=self._ring_size,
            encode=self._encode,
            decode=self._decode,
            tally=self._tally,
            on_close=self._stream_closed,
            wakeup_lot=self._wakeup_lot,
            fanout=self._fanout,
        )
        self._streams[stream_id] = stream
        self._groups.setdefault(group, []).append(stream)
        arrival = self._arrivals.pop(group, None)
        if arrival is not None:
            arrival.stream = stream
            arrival.event.set()
        return stream

    def get(self, stream_id: str) -> Stream | None:
        """The live or lingering stream with this id; None if unknown or expired."""
        self._sweep()
        return self._streams.get(stream_id)

    def latest(self, group: str) -> Stream | None:
        """The most recently opened stream of ``group`` that is live or lingering."""
        self._sweep()
        streams = self._groups.get(group)
        return streams[-1] if streams else None

    def active(self) -> list[Stream]:
        """Live (not ended) streams, oldest first."""
        return [stream for stream in self._streams.values() if not stream.ended]

    async def wait_for_stream(self, group: str) -> Stream:
        """Wait for the NEXT stream opened in ``group`` and return it.

        A stream already open when this is called does not count (check
        :meth:`latest` first; both are synchronous up to the wait, so nothing
        can slip between them). Bound it with ``trio.move_on_after``.
        Cancellation leaves no trace: the waiter is forgotten.
        """
        arrival = self._arrivals.get(group)
        if arrival is None:
            arrival = self._arrivals[group] = _Arrival()
        arrival.waiters += 1
        try:
            await arrival.event.wait()
        finally:
            arrival.waiters -= 1
            if arrival.waiters == 0 and self._arrivals.get(group) is arrival:
                del self._arrivals[group]
        assert arrival.stream is not None  # set before the event fires
        return arrival.stream

    # -- expiry ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Free streams whose linger has passed; runs until cancelled.

        Sleeps until the next expiry, or indefinitely while nothing
        lingers (no periodic tick); a stream closing wakes it. At most one
        ``run()`` per manager (a second raises RuntimeError). Reports
        started at once.
        """
        if self._running:
            raise RuntimeError("ObservationManager.run() is already running")
        self._running = True
        try:
            task_status.started()
            while True:
                self._sweep()
                deadline = self._lingering[0].ended_at if self._lingering else None
                with trio.move_on_at(math.inf if deadline is None else deadline + self._linger):
                    await self._sweeper.park()
        finally:
            self._running = False

    def _stream_closed(self, stream: Stream) -> None:
        was_empty = not self._lingering
        self._lingering.append(stream)
        if was_empty:
            # run() may be sleeping with no deadline; later closes expire
            # after this one, so only the first needs to wake it.
            self._sweeper.unpark_all()

    def _sweep(self) -> None:
        """Forget and release every stream whose linger has passed."""
        lingering = self._lingering
        if not lingering:
            return
        now = trio.current_time()
        while lingering:
            stream = lingering[0]
            assert stream.ended_at is not None
            if stream.ended_at + self._linger > now:
                break
            lingering.popleft()
            del self._streams[stream.stream_id]
            group = self._groups[stream.group]
            group.remove(stream)
            if not group:
                del self._groups[stream.group]
            stream._release()

    # -- introspection -----------------------------------------------------

    def statistics(self) -> ObservationStatistics:
        """A snapshot of streams, readers and lag (expired streams excluded)."""
        self._sweep()
        live = sum(1 for stream in self._streams.values() if not stream.ended)
        tally = self._tally
        return ObservationStatistics(
            streams_live=live,
            streams_lingering=len(self._streams) - live,
            readers=tally.readers,
            observers=tally.observers,
            events_buffered=sum(stream.buffered for stream in self._streams.values()),
            lagged_total=tally.lagged_total,
            peak_readers=tally.peak_readers,
            waiters=sum(arrival.waiters for arrival in self._arrivals.values()),
        )
