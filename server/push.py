"""A stream's own client, written by the run itself: one wake-up per event (issue 10).

The client's response was a reader of the run's ring like any observer: the
run published, then the response's task woke and wrote — two task switches
per event, and the second cost ~7-13 µs of every event (``bench_floor.py``'s
``floor-relay``). Now the response is a :class:`Push`: right after it
publishes, the run writes what its client has not had yet through the
response's ASGI ``send``, in its own task. Observers still read the ring as
before, and the client is still the ring's primary reader (its cursor is
the :class:`~observation.Reader`), so replay, resume and "never skipped"
are unchanged.

The response's own task (:func:`serve_push`) stays the owner of the
response: it writes the replay of a resume, the heartbeats, and what the
run could not write (the closing events), and it ends the response once the
stream ended and all was written. While the run is writing, every other
writer only leaves its bytes for it (one writer at a time, no lock).

A run writing to a client that stopped reading waits in Hypercorn's
shielded socket write, where no cancellation reaches it. Slow clients end
as before (the kernel's ``TCP_USER_TIMEOUT``, :mod:`server.serving`). When
the run is told to stop meanwhile (a supervisor's stop, a shutdown, a
deleted session) its client has :data:`~server.run.FINAL_WAIT_S` to catch up;
then the response's task cuts the connection (:func:`server.serving.cut_peer`),
the write fails, and the run ends and settles as it would have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import trio
from hypercorn.typing import ASGISendCallable

from observation import Reader

from .serving import cut_peer
from .sse import heartbeat
from .timers import Alarm, Lot, Timers

#: A stopped run's client gets this long to take what was written before it is cut.
HURRY_GRACE_S = 1.0


class Pushing(Protocol):
    """The run a :class:`Push` serves (:class:`server.run.StreamRun`)."""

    #: ``trio.current_time()`` when the run was told to stop; None while it runs on.
    stop_requested_at: float | None

    def attach(self, push: Push | None = None) -> None: ...

    def detach(self, push: Push | None = None) -> None: ...


class Push:
    """The client's response, as the primary reader of a stream, written by whoever
    has the next bytes: the run (after each publish) or the response's task."""

    __slots__ = (
        "_closed",
        "_ended",
        "_extra",
        "_guard",
        "_raised",
        "_reader",
        "_send",
        "busy",
        "lot",
        "writes",
    )

    def __init__(self, reader: Reader, send: ASGISendCallable) -> None:
        self._reader = reader
        self._send = send
        self._extra = b""  # a heartbeat, for whichever task writes next
        self._closed = False  # the response is over (or broken): nobody writes any more
        self._ended = False  # the stream ended and everything was written
        #: A write is in flight (one writer at a time: the others leave their bytes).
        self.busy = False
        #: Writes started so far: with :attr:`busy`, tells one long write from
        #: several short ones (a counter, not a clock read per event).
        self.writes = 0
        self._guard: trio.CancelScope | None = None  # the caller's scope, while it writes
        self._raised = False  # its shield was raised by shield_write
        #: The response's task parks here between heartbeats (woken: see :meth:`wake`).
        self.lot = Lot()

    @property
    def finished(self) -> bool:
        return self._closed or self._ended

    def wake(self) -> None:
        """Wake the response's task: the stream ended, or the run was told to stop."""
        self.lot.unpark_all()

    def add(self, wire: bytes) -> None:
        """Bytes for the next write (a heartbeat): never waits."""
        self._extra += wire

    def close(self) -> None:
        self._closed = True

    async def pump(self) -> None:
        """Write everything the client has not had yet, then return.

        A no-op while another task is writing (that one goes on until
        nothing is pending) and once the response is over. The writes are
        shielded: a batch taken from the ring is always written, so a task
        cancelled meanwhile still leaves its client without a gap. A failed
        write (the connection broke) closes the push and wakes the
        response's task, which ends the response; the run learns of it as
        a disconnect. Here the shield is a scope of the writes' own.
        """
        with trio.CancelScope(shield=True):
            await self.write()

    async def write(self, guard: trio.CancelScope | None = None) -> None:
        """:meth:`pump`, shielded by the caller: the run's way, once per event.

        ``guard``: the caller's innermost cancel scope (the run's, entered
        once per stream), which is cancelled only after :meth:`shield_write`.
        That raises its shield if, and only if, a write is in flight, so a
        write costs no cancel-scope work at all: a scope of its own costs
        trio ~4-6 µs, raising and lowering a shield ~1 µs each
        (``bench_instructions.py``); and this is the writes' only coroutine
        frame. None: the caller is in a shielded scope already.
        """
        if self.busy or self._closed:
            return
        self.busy = True
        self.writes += 1
        self._guard = guard
        reader, send = self._reader, self._send
        try:
            while not self._closed:
                try:
                    batch = reader.take()
                except trio.EndOfChannel:
                    self._ended, batch = True, None
                wire = b"" if batch is None else batch.wire
                if self._extra:
                    wire, self._extra = self._extra + wire, b""
                if not wire:
                    break
                await send({"type": "http.response.body", "body": wire, "more_body": True})
        except Exception:
            self._closed = True
        finally:
            self.busy = False
            self._guard = None
            if self._raised:  # by a stop meanwhile: it arrives at the next checkpoint
                self._raised = False
                assert guard is not None
                guard.shield = False
            if self._closed or self._ended:
                self.lot.unpark_all()

    def shield_write(self) -> None:
        """Before cancelling the ``guard`` of :meth:`write`: the write in flight under
        it, if any, is finished first (its shield goes up until then)."""
        if self._guard is not None and not self._raised:
            self._raised = True
            self._guard.shield = True


async def serve_push(
    run: Pushing,
    reader: Reader,
    send: ASGISendCallable,
    *,
    interval: float,
    timers: Timers,
    scope: Mapping[str, Any],
) -> None:
    """The response's task for a :class:`Push`: from the replay to the end of the stream.

    ``reader`` is the attached primary reader. Returns once the stream
    ended and everything was written, or the connection broke or was cut.
    Cancelled (the client went away): detaches, so the run ends after its
    disconnect grace, as with any reader.
    """
    push = Push(reader, send)
    run.attach(push)
    try:
        next_beat = trio.current_time() + interval
        alarm = Alarm()
        while True:
            await push.pump()  # the replay, a heartbeat, what the run left
            if push.finished:
                return
            wake_at = next_beat
            stopped_at = run.stop_requested_at
            if stopped_at is not None and push.busy:
                # The run is stopping but stuck writing to a client that does not
                # read: from the stop on, the client has HURRY_GRACE_S to take it
                # (a run starts no write after its stop, so this one began before).
                cut_at = stopped_at + HURRY_GRACE_S
                if trio.current_time() >= cut_at:
                    push.close()
                    cut_peer(scope)
                    return
                wake_at = min(wake_at, cut_at)
            woken = await timers.park_until(
                push.lot, wake_at, alarm if wake_at == next_beat else None
            )
            if not woken and trio.current_time() >= next_beat:
                next_beat += interval
                push.add(heartbeat())
    finally:
        push.close()
        run.detach(push)
        if push.busy:
            # The run's write in flight ends before the response does (bounded: the
            # connection is going away, or it was cut).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + HURRY_GRACE_S):
                while push.busy:
                    await push.lot.park()
