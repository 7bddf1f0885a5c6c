"""A reader: one cursor into a stream's ring."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from .events import Batch

if TYPE_CHECKING:
    from .stream import Stream

#: Parks the calling task on a stream's wake-up lot; False: gave up (no event).
Park = Callable[[Any], Awaitable[bool]]


class Reader:
    """A cursor into one stream, attached while its ``with`` block runs.

    Obtain with ``with stream.reader(after_id=..., primary=...) as reader:``.
    Entering attaches (counts go up); leaving detaches (counts go down),
    whatever happened inside, cancellation included.

    At attach time the cursor is placed at ``after_id``, clamped into the
    ring: events already dropped before attaching are *not* reported as
    ``skipped`` (compare ``backlog()[1]`` with ``after_id + 1`` to detect
    them), and an ``after_id`` beyond ``last_id`` continues live.

    Delivery guarantees, for every reader:
      * ids arrive in order, with no duplicate;
      * there is no gap except one announced by ``Batch.skipped``, which is
        exactly the number of ids missing before ``Batch.events[0]``;
      * the first batch ends exactly at :attr:`history_end` when the replay
        is non-empty (unless the reader lagged past it before reading), so
        the caller can frame it with history-start/history-end;
      * every later batch is everything between the cursor and the head;
      * a primary reader is never skipped (the producer waits for it),
        except for a reader still undrained when the stream expires (it is
        told what it missed as skipped, then the ending);
      * iteration ends once the stream is closed and all was delivered.

    The observe endpoint's shape::

        with stream.reader(after_id=0) as reader:
            count, from_id = reader.backlog()
            send(history-start {count, fromId: from_id})
            framed = False
            async for batch in reader:
                if batch.skipped:
                    send(lagged {skipped: batch.skipped})
                write(batch.wire)                      # one write per wake-up
                if not framed and reader.position >= reader.history_end:
                    send(history-end {lastId: reader.history_end})
                    framed = True
            # (send history-end before the loop when count == 0)
    """

    __slots__ = (
        "_after_id",
        "_attached",
        "_backlog",
        "_history_end",
        "_position",
        "_receiving",
        "_stream",
        "primary",
    )

    def __init__(self, stream: Stream, after_id: int, *, primary: bool) -> None:
        self._stream = stream
        self._after_id = after_id
        self.primary = primary
        self._attached = False
        self._receiving = False
        self._position = 0
        self._history_end = 0
        self._backlog = (0, 1)

    def __repr__(self) -> str:
        kind = "primary" if self.primary else "observer"
        return f"<Reader {kind} of {self._stream.stream_id!r} at {self._position}>"

    @property
    def stream(self) -> Stream:
        return self._stream

    @property
    def position(self) -> int:
        """Last id delivered (or skipped past); the next batch starts after it."""
        return self._position

    @property
    def history_end(self) -> int:
        """The stream's ``last_id`` when this reader attached."""
        return self._history_end

    def backlog(self) -> tuple[int, int]:
        """``(count, from_id)`` of the replay, fixed at attach time.

        ``count`` events with ids ``from_id .. history_end`` are replayed;
        when ``count == 0``, ``from_id == history_end + 1``.
        """
        return self._backlog

    # -- attach / detach ---------------------------------------------------

    def __enter__(self) -> Reader:
        if self._attached:
            raise RuntimeError("reader is already attached")
        stream = self._stream
        stream._attach(self)
        last = stream.last_id
        # Clamp into the ring: not before the oldest buffered, not after the head.
        self._position = min(max(self._after_id, stream.first_id - 1), last)
        self._history_end = last
        self._backlog = (last - self._position, self._position + 1)
        self._attached = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._attached:
            self._attached = False
            self._stream._detach(self)

    # -- receiving ---------------------------------------------------------

    def next_batch_nowait(self) -> Batch:
        """Everything pending, at once; never waits.

        Raises :class:`trio.WouldBlock` when nothing is pending,
        :class:`trio.EndOfChannel` once the stream ended and all was
        delivered, :class:`trio.ClosedResourceError` when not attached.
        """
        batch = self._take()
        if batch is None:
            raise trio.WouldBlock
        return batch

    async def next_batch(self) -> Batch:
        """Wait until something is pending, then take all of it.

        Always a checkpoint. Cancellation is atomic: if cancelled, the
        cursor did not move and nothing was lost. Raises
        :class:`trio.EndOfChannel` after the stream ended and all was
        delivered, :class:`trio.BusyResourceError` if another task is
        already waiting on this reader.
        """
        batch = await self.next_batch_or(None)
        assert batch is not None
        return batch

    async def next_batch_or(self, park: Park | None) -> Batch | None:
        """As :meth:`next_batch`, but wait by ``await park(lot)`` on the stream's
        wake-up lot; when that returns False (its deadline passed, say),
        return None and leave the cursor where it was. ``park`` None: wait
        on the lot itself, as :meth:`next_batch` does.

        This is how a reader waits for "the next event or my heartbeat"
        without entering a cancel scope per wait (``park`` can be a timer
        service's ``park_until(lot, deadline)``). Same guarantees as
        :meth:`next_batch`. (The implementation of both: an observer's every
        wake-up resumes the frames of its whole await chain, so no
        forwarding frame stands in it.)
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already reading this reader")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            fanout = None if self.primary else self._stream._fanout
            if fanout is not None and self._position < self._stream.last_id:
                # Behind already: in line with the other observers, so that many of
                # them never fill a scheduler pass (observation.fanout). Nothing is
                # taken before the turn, so a cancellation here loses nothing.
                await fanout.turn()
                batch = self._take()
                if batch is not None:
                    return batch
            else:
                batch = self._take()
                if batch is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return batch
            # All readers of the stream share one parking lot, unparked by
            # publish, close and release: one publish wakes them all. This
            # is the hot path, so no exception and no extra frame per wake-up.
            lot = self._stream._wakeup
            while True:
                if park is None:
                    await lot.park()
                elif not await park(lot):
                    return None
                batch = self._take()
                if batch is not None:
                    return batch
        finally:
            self._receiving = False

    def _take(self) -> Batch | None:
        """Move the cursor to the head and return what it passed; None if nothing."""
        if not self._attached:
            raise trio.ClosedResourceError("reader is not attached")
        stream = self._stream
        position = self._position
        ring = stream._ring
        newest = ring.last_id  # no property chain: this runs twice per event of every reader
        if position == newest and position >= self._history_end:  # nothing new
            if stream._ended_at is not None:
                raise trio.EndOfChannel
            return None
        skipped = 0
        oldest = ring.first_id
        if position < oldest - 1:
            # Fell off the back of the ring: skip forward to the oldest held.
            skipped = oldest - 1 - position
            position = oldest - 1
        # Cap the replay at history_end so the first batch is exactly the history.
        last = self._history_end if position < self._history_end else newest
        if position == last and not skipped:
            if stream._ended_at is not None:
                raise trio.EndOfChannel
            return None
        if position == last:
            batch = Batch((), skipped, b"")  # only after the ring was released, ending and all
        else:
            # Up to date and not skipped: the batch the last publish built, as is.
            batch = stream._cached  # type: ignore[assignment]
            if skipped or batch is None or batch.first_id != position + 1 or batch.last_id != last:
                batch = stream._batch(position + 1, last, skipped)
        self._position = last
        if skipped:
            stream._lagged(skipped)
        if stream._producer_waits and self.primary:  # the producer waits for room
            stream._space.unpark_all()
        return batch

    #: As :meth:`next_batch_nowait`, but None when nothing is pending (no
    #: exception: for a writer that drains the reader after every publish,
    #: :mod:`server.push`, so no frame of its own).
    take = _take

    def __aiter__(self) -> Reader:
        return self

    async def __anext__(self) -> Batch:
        try:
            return await self.next_batch()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
