"""Streams left in the database with no run to end them: ended now, or again later.

A stream can be left so in two ways:

- its open failed, though its commit may have happened all the same (a
  PostgreSQL connection lost in ``COMMIT``): the caller was refused, and the
  reservation and the turn's rows may be stored with no stream behind them;
- its ending could not be recorded (:meth:`server.run.StreamRun._finish`:
  the database failed through every retry): the message stays ``streaming``
  and the reservation held, and its readers were told "not saved, not
  charged".

Both end the way start-up recovery ends what a dead process left, for this
one stream: its reservation released (nothing charged), its assistant
message ``interrupted`` (with the text it streamed, if any). :meth:`later`
queues the stream (never waits: a refused caller is not kept waiting for
it) for :meth:`run`, the hub's task, which tries what comes at once and
the rest again every :data:`RETRY_S` until each is ended — so a database
that comes back frees the credits without a restart, which in cluster mode
(no start-up sweep there) nothing else would. A round stops at the first
try that fails: the database is away, and the others wait for the next
round. Idempotent: a reservation already closed and a message no longer
``streaming`` are left alone (recovery, a survivor or an earlier try may
have ended it), and nothing of an open that did not commit is found.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

import ledger

from .db import TRANSIENT, Db
from .storage import StoreBackend

__all__ = ["RETRY_S", "Abandoned"]

log = logging.getLogger("chinwag.streams")

#: Seconds between tries of the queued streams.
RETRY_S = 5.0

#: One try's bound (a write that has started in its thread runs to its end).
TRY_TIMEOUT_S = 5.0


class Abandoned:
    """The streams to end without a run (module docstring); start :meth:`run` in a nursery."""

    def __init__(self, db: Db) -> None:
        self._db = db
        # Stream id -> (user id, the text it streamed), in the order they came.
        self._queue: dict[str, tuple[str, str]] = {}
        self._queued = trio.lowlevel.ParkingLot()  # run() waits here for the first
        self._drained = trio.lowlevel.ParkingLot()  # unparked when the queue empties
        self._tried = trio.lowlevel.ParkingLot()  # unparked as each round of tries ends
        self._round = trio.Lock()  # a shutdown's round waits for the task's
        #: Called (awaited) with each queued stream once it is ended: cluster mode
        #: takes it off the cluster's live list then (``ClusterLink.finished``).
        self.on_ended: Callable[[str], Awaitable[None]] | None = None

    @property
    def queued(self) -> list[str]:
        """Stream ids waiting for another try."""
        return list(self._queue)

    async def end(self, stream_id: str, user_id: str, content: str = "") -> bool | None:
        """End ``stream_id`` now (through transient failures while the caller's
        deadline allows); False (logged) if the database could not be asked,
        None (logged) if it refused this one for a reason of its own."""

        def end(store: StoreBackend, book: ledger.LedgerBackend) -> tuple[int, bool]:
            released = 0
            for held in book.open_reservations(user_id):
                if held.streaming_session_id == stream_id:
                    try:
                        book.release(held.id)
                    except ledger.ReservationClosed:
                        continue  # another ending closed it after the listing
                    released += 1
            message = store.message_by_stream(stream_id)
            cut = False
            if message is not None and message["status"] == "streaming":
                cut = store.finish_message(
                    message["id"],
                    content=content,
                    status="interrupted",
                    input_tokens=0,
                    output_tokens=0,
                    credits_charged=0,
                    finish_reason="error",
                )
            return released, cut

        try:
            released, cut = await self._db.write_retried(end)
        except Exception as exc:
            log.warning(
                "stream %s: not ended yet (%s): its reservation, if stored, stays held "
                "until a later try, the next start-up's recovery or, in cluster mode, "
                "a survivor",
                stream_id,
                type(exc).__name__,
            )
            return False if isinstance(exc, TRANSIENT) else None
        if released or cut:
            log.warning(
                "stream %s: ended without its run: %d reservation(s) released, nothing "
                "charged; message interrupted: %s",
                stream_id,
                released,
                cut,
            )
        return True

    def later(self, stream_id: str, user_id: str, content: str = "") -> None:
        """Queue ``stream_id`` for :meth:`run` (never waits)."""
        self._queue[stream_id] = (user_id, content)
        self._queued.unpark_all()

    async def drained(self) -> None:
        """Wait until nothing is queued."""
        while self._queue:
            await self._drained.park()

    async def round_ended(self) -> None:
        """Wait until the next round of tries ends (whatever it achieved)."""
        await self._tried.park()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Try what is queued at once, then every :data:`RETRY_S` while anything
        is left (the hub's task)."""
        task_status.started()
        while True:
            while not self._queue:
                await self._queued.park()
            await self.try_all()
            if self._queue:
                await trio.sleep(RETRY_S)

    async def try_all(self) -> None:
        """A try for each queued stream, in turn, until one fails (also the hub's
        last act at shutdown); one round at a time."""
        async with self._round:
            await self._try_each()
        self._tried.unpark_all()
        if not self._queue:
            self._drained.unpark_all()

    async def _try_each(self) -> None:
        for stream_id, (user_id, content) in list(self._queue.items()):
            ended: bool | None = False
            with trio.move_on_after(TRY_TIMEOUT_S):
                ended = await self.end(stream_id, user_id, content)
            if ended is None:
                continue  # this one's own trouble: the rest are tried
            if not ended:
                break  # the database is away: the rest wait for the next round
            del self._queue[stream_id]  # (rounds take turns: nothing else takes it off)
            if self.on_ended is not None:
                await self.on_ended(stream_id)
