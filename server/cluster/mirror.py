"""Consumer side: a remote stream mirrored into a local ring, one reader per stream per node.

When a reader (an observer, a resumed client) arrives on a node that does
not run the stream, :meth:`Mirror.open` opens a local ring for it with
``ObservationManager.open_stream(stream_id, group=session_id, info=...)``,
fills it with the history the cluster's copy holds (one round trip), and
starts ONE task that follows the copy with a blocking ``XREAD`` and
publishes each batch into the ring in order. Local readers are cursors as
always: a thousand observers on this node cost one Redis read per batch,
and observation code never learns which node produced an event. The ids
are the producer's ids and the wire bytes are rebuilt with the same
encoder, so they are byte-identical to what the client got.

Gaps are never silent. The copy's entry ids are the event ids
(:mod:`server.cluster.publisher`), so a mirror knows exactly what it did
not get — Redis trimmed history it had not read, lost entries in a restart,
or the producer dropped events while Redis was away. The missing ids are
published as *gap fillers*: events named :data:`GAP` that the encoder from
:func:`mirror_encoder` turns into nothing on the wire, except the last one,
which is ``event: lagged`` ``{"skipped": N}`` (no id line, as an observer's
own lag is told). Ids stay aligned with the producer's (a resume with
``Last-Event-ID`` on any node means the same event), readers see every real
event byte-identical, and exactly where events are missing they read
``lagged``. A late join whose history Redis trimmed (``MAXLEN ~`` keeps at
least a ring) pushes the fillers out of the ring before anyone reads:
nothing is shown, as on the producer's node. Readers of the events
themselves (the WebSocket feed) skip events named :data:`GAP` and send
``lagged`` for the one with data.

Lifetime: a mirror follows its stream until the end marker, then closes the
local ring, which lingers ``CHINWAG_STREAM_BUFFER_MS`` like any ended stream
and is then forgotten. Redis trouble: the reader retries with a backoff and
continues from the last id it has, so an outage costs a gap only if the
copy lost entries meanwhile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from observation import ObservationManager, Stream

from ..sse import encode_event
from .publisher import END_ID, RETRY_FIRST_S, RETRY_MAX_S
from .redis import ClusterRedis, ClusterUnavailable, text
from .registry import info_from_meta

__all__ = ["GAP", "Mirror", "MirrorStatistics", "mirror_encoder"]

log = logging.getLogger("chinwag.cluster.mirror")

#: The name of a gap filler: an id the mirror never got.
GAP = "chinwag:gap"
#: How long one blocking XREAD waits before the reader looks around.
BLOCK_MS = 2_000
#: How many entries one read takes at most.
READ_COUNT = 1_000

Encode = Callable[[int, str, str], bytes]


def mirror_encoder(encode: Encode = encode_event) -> Encode:
    """The ring encoder for a node that mirrors: ``encode`` for every real event;
    a gap filler is nothing, or ``event: lagged`` when it carries the count."""

    def encode_or_gap(event_id: int, name: str, data: str) -> bytes:
        if name != GAP:
            return encode(event_id, name, data)
        return encode_event(None, "lagged", data) if data else b""

    return encode_or_gap


@dataclass(frozen=True, slots=True)
class MirrorStatistics:
    """mirrors: following a live stream now; events: mirrored; gaps/skipped: gaps
    told and the ids they covered."""

    mirrors: int
    events: int
    gaps: int
    skipped: int


class Mirror:
    """This node's mirrors of remote streams (see the module docstring)."""

    def __init__(
        self,
        redis: ClusterRedis,
        observations: ObservationManager,
        *,
        info_for: Callable[[str], object] = lambda dialect: dialect,
        block_ms: int = BLOCK_MS,
        is_mine: Callable[[str], bool] = lambda stream_id: False,
    ) -> None:
        self.redis = redis
        self.observations = observations
        #: A stream this node runs (registered, not finished) is never mirrored
        #: here: until its open has stored it, it has no ring yet, and a mirror
        #: under its id would stand where the run's own ring must open.
        self.is_mine = is_mine
        #: The ``info`` of a mirrored ring, from the stream's dialect name.
        self.info_for = info_for
        self.block_ms = block_ms
        self._nursery: trio.Nursery | None = None
        self._opening: dict[str, trio.Event] = {}
        self._following: set[str] = set()
        self._events = self._gaps = self._skipped = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the reader tasks; runs until cancelled (which ends them all)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def open(self, stream_id: str) -> Stream | None:
        """The local ring of a stream, mirrored on demand; None if the cluster has no
        such stream (never started, or gone from its buffer).

        A stream this node already has (its own, or mirrored) is returned as
        it is. Concurrent calls for one stream share one mirror. Once this
        returns a stream, its history is in the ring and its reader runs.
        Raises ``ClusterUnavailable``. Cancellation before the ring is
        opened leaves nothing behind.
        """
        while True:
            stream = self.observations.get(stream_id)
            if stream is not None:
                return stream
            opening = self._opening.get(stream_id)
            if opening is None:
                break
            await opening.wait()
            if stream_id not in self._following and self.observations.get(stream_id) is None:
                return None
        assert self._nursery is not None, "Mirror.run() is not running"
        done = self._opening[stream_id] = trio.Event()
        try:
            return await self._open(stream_id)
        finally:
            del self._opening[stream_id]
            done.set()

    async def _open(self, stream_id: str) -> Stream | None:
        keys, client = self.redis.keys, self.redis.client
        with self.redis.guard("mirror"):
            async with client.pipeline(transaction=False) as pipe:
                meta_request = pipe.hgetall(keys("stream", stream_id, "meta"))
                history_request = pipe.xrange(keys("stream", stream_id))
            meta, history = dict(await meta_request), await history_request
        info = info_from_meta(meta) if meta else None
        if info is None or self.is_mine(stream_id):  # still opening here: none yet, as on one node
            return None
        # Synchronous from here to the reader's start: nothing can slip in between.
        stream = self.observations.open_stream(
            stream_id, group=info.session_id, info=self.info_for(info.dialect)
        )
        self._feed_nowait(stream, history)
        if not stream.ended:
            last = text(history[-1].identifier) if history else "0-0"
            self._following.add(stream_id)
            assert self._nursery is not None
            self._nursery.start_soon(self._follow, stream, last, name=f"mirror {stream_id}")
        return stream

    async def open_latest(self, session_id: str) -> Stream | None:
        """The chat session's newest stream (live, or within its buffer), mirrored."""
        with self.redis.guard("latest"):
            value = await self.redis.client.get(self.redis.keys("session", session_id, "latest"))
        return await self.open(value.decode()) if value is not None else None

    async def _follow(self, stream: Stream, last: str) -> None:
        """Follow the copy from entry ``last`` until its end; the ring's one producer."""
        key = self.redis.keys("stream", stream.stream_id)
        backoff = RETRY_FIRST_S
        try:
            while not stream.ended:
                try:
                    with self.redis.guard("follow", timeout=self.block_ms / 1000 + 5):
                        reply = await self.redis.client.xread(
                            {key: last}, count=READ_COUNT, block=self.block_ms
                        )
                except ClusterUnavailable as exc:
                    log.warning("mirror %s: %s", stream.stream_id, exc)
                    await trio.sleep(backoff)
                    backoff = min(RETRY_MAX_S, backoff * 2)
                    continue
                backoff = RETRY_FIRST_S
                entries = reply.get(key.encode(), ()) if reply else ()
                if entries:
                    last = text(entries[-1].identifier)
                    await self._feed(stream, entries)
        finally:
            self._following.discard(stream.stream_id)
            if not stream.ended:  # cancelled (shutdown): readers end too
                stream.close()

    def _feed_nowait(self, stream: Stream, entries: Sequence[Any]) -> None:
        """The history into a just-opened ring (no primary reader yet: never blocks)."""
        for name, data in self._events_of(stream, entries):
            if name is None:
                stream.close(ending=int(data))
                return
            stream.publish_nowait(name, data)

    async def _feed(self, stream: Stream, entries: Sequence[Any]) -> None:
        for name, data in self._events_of(stream, entries):
            if name is None:
                stream.close(ending=int(data))
                return
            try:
                stream.publish_nowait(name, data)
            except trio.WouldBlock:  # a resumed client, a whole ring behind
                await stream.publish(name, data)

    def _events_of(self, stream: Stream, entries: Sequence[Any]) -> list[tuple[Any, str]]:
        """What to publish for these entries: events, gap fillers, and at the end
        ``(None, ending)``: how many of the last events are the closing ones."""
        out: list[tuple[Any, str]] = []
        last = stream.last_id
        for entry in entries:
            fields = entry.field_values
            ident = text(entry.identifier)
            if ident == END_ID:
                end = int(fields[b"end"])
                if end > last:
                    out += self._gap(last, end)
                out.append((None, fields.get(b"k", b"1").decode()))
                return out
            event_id = int(ident.split("-")[1])
            if event_id <= last:
                continue
            if event_id > last + 1:
                out += self._gap(last, event_id - 1)
            out.append((fields[b"n"].decode(), fields[b"d"].decode()))
            last = event_id
            self._events += 1
        return out

    def _gap(self, last: int, upto: int) -> list[tuple[Any, str]]:
        """Fillers for ids ``last+1 .. upto``; the last one tells ``lagged``."""
        missing = upto - last
        self._gaps += 1
        self._skipped += missing
        notice = json.dumps({"skipped": missing}, separators=(",", ":"))
        return [(GAP, "")] * (missing - 1) + [(GAP, notice)]

    def statistics(self) -> MirrorStatistics:
        return MirrorStatistics(len(self._following), self._events, self._gaps, self._skipped)
