"""A chat session's stream, wherever in the cluster it runs, for its observers.

:class:`StreamWatch` answers the observe routes' two questions (SPEC §6,
§9): which is the session's newest stream (this node's ring, or a mirror of
another node's), and, for an observer that came with ``?wait=`` before any
stream started, which stream starts next. Waiting costs one watcher per
session per node, whatever the number of waiters: it waits for a local ring
to open and, between, looks in Redis every :data:`WAIT_POLL_S` and mirrors
what it finds. Its watchers run in the nursery of :meth:`StreamWatch.run`.
"""

from __future__ import annotations

import logging

import trio

from observation import ObservationManager, Stream

from .mirror import Mirror
from .redis import ClusterUnavailable

log = logging.getLogger("chinwag.cluster")

#: How often an observer waiting for a stream (``?wait=``) looks for one in Redis.
WAIT_POLL_S = 0.1


class _Watch:
    """Observers waiting for a chat session's next stream on this node."""

    __slots__ = ("found", "started", "stream", "waiters")

    def __init__(self) -> None:
        self.found = trio.Event()
        self.stream: Stream | None = None
        self.waiters = 0
        self.started = False


class StreamWatch:
    """The streams of chat sessions across the cluster, as this node's observers see them."""

    def __init__(self, mirror: Mirror, observations: ObservationManager) -> None:
        self.mirror = mirror
        self.observations = observations
        self._nursery: trio.Nursery | None = None
        #: Observers waiting (``?wait=``) for a stream, per chat session.
        self._watches: dict[str, _Watch] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the watchers; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def latest(self, session_id: str) -> Stream | None:
        """The session's newest stream anywhere in the cluster (mirrored here if remote)."""
        try:
            return await self.mirror.open_latest(session_id)
        except ClusterUnavailable:
            return self.observations.latest(session_id)  # what this node has is all it knows

    async def wait_for_stream(self, session_id: str, until: float) -> Stream | None:
        """The session's stream once one starts anywhere; None if none has by ``until``.

        Every waiter of the session on this node gets what its one watcher found.
        """
        # A stream found while the caller was away (writing a heartbeat) counts: the
        # session had none when the observer came, so any it has now is new.
        stream = self.observations.latest(session_id)
        if stream is not None:
            return stream
        watch = self._watches.get(session_id)
        if watch is None or watch.found.is_set():
            watch = self._watches[session_id] = _Watch()
            assert self._nursery is not None, "StreamWatch.run() is not running"
            self._nursery.start_soon(self._watch_for_stream, session_id, watch)
        watch.waiters += 1
        try:
            with trio.move_on_at(until):
                await watch.found.wait()
            return watch.stream
        finally:
            watch.waiters -= 1

    async def _watch_for_stream(self, session_id: str, watch: _Watch) -> None:
        try:
            while watch.waiters or not watch.started:
                watch.started = True
                with trio.move_on_after(WAIT_POLL_S):
                    watch.stream = await self.observations.wait_for_stream(session_id)
                if watch.stream is None:
                    try:
                        watch.stream = await self.mirror.open_latest(session_id)
                    except ClusterUnavailable as exc:
                        log.debug("waiting for a stream on %s: %s", session_id, exc)
                if watch.stream is not None:
                    watch.found.set()
                    return
        finally:
            if self._watches.get(session_id) is watch:
                del self._watches[session_id]
