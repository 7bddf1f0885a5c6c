"""How the server uses cluster mode (SPEC §9): the hub's, the routes' and recovery's side.

:mod:`server.cluster` holds the parts that talk to Redis; this module
connects them to the :class:`~server.streams.StreamHub`, the database and
the routes. It exists only when ``CHINWAG_REDIS_URL`` is set (the app then
imports it; a single process never loads coredis). One
:class:`ClusterLink` per process:

- **the hub's side** — :meth:`ClusterLink.admit` claims the chat session and
  the user's cap place and registers the stream, before anything is written
  (so a node that dies right after leaves something for a survivor to
  recover); :meth:`ClusterLink.owns_ending` asks whether this node may
  persist and settle (False: a survivor took the stream over);
  :meth:`ClusterLink.release` and :meth:`ClusterLink.finished` give the
  claim back and take the stream off the live list. What cannot reach Redis
  is retried every second until it does;
- **recovery** — :meth:`ClusterLink.settle` ends a dead node's stream in the
  database (message ``interrupted``, reservation settled for the tokens the
  cluster saw produced, or released) and returns the closing events
  (``done`` with ``NODE_LOST``) that survivors publish for its readers;
- **signals** — :meth:`ClusterLink.handle` answers another node's stop,
  end-session, attach/detach or shutdown for a stream running here;
- **the routes' side** — the stream a session's observers see
  (:class:`~server.cluster.watch.StreamWatch`), a stream by
  id (mirrored if it runs elsewhere), stop / end-session wherever the stream
  runs, the cluster's live list, the rate limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import trio

from observation import ObservationManager, Stream

from .cluster import (
    Admission,
    Cluster,
    ClusterUnavailable,
    NodeLost,
    RecoveredStream,
    SessionBusy,
    StreamInfo,
    UserAtCap,
)
from .cluster.watch import StreamWatch
from .db import Db
from .dialects import Dialect
from .errors import ApiError, Conflict, TooMany
from .limits import RateLimiter
from .models import Catalog
from .recovery import settle_recovered
from .run import RECORD_S, TELL_S
from .settings import Settings
from .streams import StreamHub

__all__ = ["ClusterLink", "busy"]

log = logging.getLogger("chinwag.cluster")

#: How often this node tells the cluster its observer counts and retries what failed.
HOUSEKEEPING_S = 1.0
#: How long each Redis step of a stream's ending may take: the ending's whole budget
#: (CLEANUP_TIMEOUT_S) is for the database and the closing events, so a Redis that
#: hangs (rather than refuses) costs at most this much, then is retried later.
ENDING_STEP_S = 1.0
#: How long a stop or end-session waits for the stream's node to answer: the
#: ending's Redis step, its record and its telling of readers, and a margin.
ANSWER_WITHIN_S = ENDING_STEP_S + RECORD_S + TELL_S + 1.0


def busy(exc: ClusterUnavailable) -> ApiError:
    """503 for a decision that needs Redis while it is away (SPEC §9)."""
    return ApiError(
        "The service is temporarily unavailable, please retry shortly.",
        status=503,
        error_code="SERVICE_UNAVAILABLE",
        headers={"Retry-After": str(exc.retry_after)},
    )


class _RemoteRun:
    """A stream running on another node, as a resumed client's feed sees it: attaching
    and detaching are told to that node (fire and forget, owned by the link)."""

    def __init__(self, link: ClusterLink, owner: str, stream_id: str) -> None:
        self.link, self.owner, self.stream_id = link, owner, stream_id

    def attach(self) -> None:
        self.link._tell(self.owner, "attach", {"streamId": self.stream_id})

    def detach(self) -> None:
        self.link._tell(self.owner, "detach", {"streamId": self.stream_id})


class ClusterLink:
    """This process's side of the cluster (see the module docstring)."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        settings: Settings,
        hub: StreamHub,
        db: Db,
        catalog: Catalog,
        observations: ObservationManager,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.hub = hub
        self.db = db
        self.catalog = catalog
        self.observations = observations
        self.publisher = cluster.publisher
        self._local_limits = RateLimiter(settings.rate_limit)
        self._nursery: trio.Nursery | None = None
        #: Admissions and stream ids whose release / end could not reach Redis yet.
        self._unreleased: list[Admission] = []
        self._unfinished: list[str] = []
        self._observers_told: dict[str, int] = {}
        #: The routes' streams of a session, wherever they run (``?wait=`` included).
        self.watch = StreamWatch(cluster.mirror, observations)

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster and run every part, plus housekeeping, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.cluster.run, self.settle, self.handle, self.on_lost)
            await nursery.start(self.watch.run)
            nursery.start_soon(self._housekeeping)
            task_status.started()

    async def leave(self) -> None:
        """At a clean stop, after the hub has ended every stream: flush, give the lease back."""
        with trio.move_on_after(2):
            await self._retry()
            await self.publisher.wait_idle()
        try:
            with trio.move_on_after(2):
                await self.cluster.node.leave()
        except ClusterUnavailable as exc:
            log.warning("could not leave the cluster cleanly (the lease will expire): %s", exc)

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_S)
            try:
                await self._retry()
                await self._tell_observers()
            except ClusterUnavailable as exc:
                log.debug("housekeeping: %s", exc)

    async def _retry(self) -> None:
        while self._unreleased:
            await self.cluster.claims.release(self._unreleased[0])
            self._unreleased.pop(0)
        while self._unfinished:
            await self.cluster.registry.finished(self._unfinished[0])
            self._unfinished.pop(0)

    async def _tell_observers(self) -> None:
        """Each live stream's observer count on this node, where it changed."""
        counts = {s.stream_id: s.observers for s in self.observations.active() if not s.ended}
        for stream_id, count in counts.items():
            if self._observers_told.get(stream_id, 0) != count:
                await self.cluster.registry.set_observers(stream_id, count)
                self._observers_told[stream_id] = count
        for stream_id in [s for s in self._observers_told if s not in counts]:
            del self._observers_told[stream_id]

    def _tell(self, incarnation: str, kind: str, args: dict[str, Any]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._tell_now, incarnation, kind, args)

    async def _tell_now(self, incarnation: str, kind: str, args: dict[str, Any]) -> None:
        try:
            await self.cluster.signals.request(incarnation, kind, args, answer_within=2.0)
        except ClusterUnavailable as exc:
            log.warning("could not tell %s to %s: %s", incarnation, kind, exc)

    # -- the hub's side --------------------------------------------------------------

    async def admit(
        self,
        *,
        stream_id: str,
        session_id: str,
        user_id: str,
        model_id: str,
        dialect: Dialect,
        input_tokens: int,
    ) -> Admission:
        """Claim the session and a cap place, then register the stream (2 round trips).

        Refusals are the API's own errors (409, 429, 503). Nothing is left
        held when this raises.
        """
        claims = self.cluster.claims
        try:
            admission = await claims.admit(session_id, user_id, stream_id)
        except SessionBusy:
            raise Conflict(
                "A stream is already active on this chat session.",
                error_code="STREAM_ALREADY_ACTIVE",
            ) from None
        except UserAtCap:
            raise TooMany(
                "Too many concurrent streams for this user.", error_code="TOO_MANY_STREAMS"
            ) from None
        except ClusterUnavailable as exc:
            raise busy(exc) from None
        info = StreamInfo(
            stream_id=stream_id,
            session_id=session_id,
            user_id=user_id,
            model_id=model_id,
            # Looked up by stream id at recovery: registered before they exist.
            reservation_id="",
            message_id="",
            dialect=dialect.name,
            started_at=time.time(),
            node_id=self.cluster.identity.node_id,
            input_tokens=input_tokens,
        )
        try:
            await self.cluster.registry.register(info)
        except BaseException as exc:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await self.release(admission)
                if not isinstance(exc, NodeLost):  # it may have reached Redis
                    await self.finished(stream_id)
            if isinstance(exc, ClusterUnavailable):
                raise busy(exc) from None
            if isinstance(exc, NodeLost):
                raise busy(ClusterUnavailable("this node is joining the cluster again")) from None
            raise
        return admission

    async def owns_ending(self, stream_id: str) -> bool:
        """May this node persist and settle the stream? False: a survivor has it.

        True when Redis cannot say: nobody can take a stream over while the
        owner's lease cannot expire unnoticed... unless Redis is reachable from
        the others and not from here (a partition); then the ledger's
        exactly-once settlement refuses the second of the two settlements.
        """
        try:
            with trio.move_on_after(ENDING_STEP_S):
                return await self.cluster.registry.finishing(stream_id)
            exc: Exception = TimeoutError(f"no answer within {ENDING_STEP_S} s")
        except ClusterUnavailable as unavailable:
            exc = unavailable
        log.warning("stream %s: Redis cannot say who ends it (%s); ending it", stream_id, exc)
        return True

    async def release(self, admission: Admission | None) -> None:
        """Give the session claim and the cap place back (retried later if Redis is away)."""
        if admission is None:
            return
        try:
            with trio.move_on_after(ENDING_STEP_S):
                await self.cluster.claims.release(admission)
                return
        except ClusterUnavailable:
            pass
        except trio.Cancelled:  # the ending's deadline ran out: housekeeping sends it
            self._unreleased.append(admission)
            raise
        self._unreleased.append(admission)  # compare-and-delete: safe to send again

    async def finished(self, stream_id: str) -> None:
        """Off the live lists; its traces expire after the buffer (retried if Redis is away)."""
        try:
            with trio.move_on_after(ENDING_STEP_S):
                await self.cluster.registry.finished(stream_id)
                return
        except ClusterUnavailable:
            pass
        except trio.Cancelled:  # as in release()
            self._unfinished.append(stream_id)
            raise
        self._unfinished.append(stream_id)

    def on_lost(self, lost: Sequence[StreamInfo]) -> None:
        """A survivor took this node's streams over: stop them here, leave the database."""
        for info in lost:
            run = self.hub.for_stream(info.stream_id)
            if run is not None:
                run.cancel("node_lost")

    # -- recovery ------------------------------------------------------------------

    async def settle(self, stream: RecoveredStream) -> list[tuple[str, str]]:
        """A dead node's stream, ended in the database once (see :mod:`server.recovery`)."""
        return await settle_recovered(
            stream,
            redis=self.cluster.redis,
            db=self.db,
            catalog=self.catalog,
            credit_usd=self.settings.credit_usd,
        )

    # -- signals from other nodes -------------------------------------------------

    async def handle(self, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        """Another node's request for a stream running here (see :mod:`server.cluster.signals`)."""
        hub = self.hub
        if kind == "stop":
            return {"finishReason": await hub.stop(str(args["streamId"]), args.get("note"))}
        if kind == "end-session":
            await hub.end_session_streams(str(args["sessionId"]))
            return {}
        if kind in ("attach", "detach"):
            run = hub.for_stream(str(args["streamId"]))
            if run is not None:
                run.attach() if kind == "attach" else run.detach()
            return {}
        if kind == "shutdown":
            await hub.shutdown()
            return {}
        raise ValueError(f"unknown signal {kind!r}")

    # -- the routes' side ----------------------------------------------------------

    async def latest(self, session_id: str) -> Stream | None:
        """The session's newest stream anywhere in the cluster (:class:`StreamWatch`)."""
        return await self.watch.latest(session_id)

    async def wait_for_stream(self, session_id: str, until: float) -> Stream | None:
        """The session's stream once one starts anywhere; None if none has by ``until``."""
        return await self.watch.wait_for_stream(session_id, until)

    async def stream(self, stream_id: str) -> Stream | None:
        """A stream by id: this node's, or mirrored from the cluster (None: unknown)."""
        stream = self.observations.get(stream_id)
        if stream is not None:
            return stream
        try:
            return await self.cluster.mirror.open(stream_id)
        except ClusterUnavailable as exc:
            raise busy(exc) from None

    async def remote_run(self, stream_id: str) -> _RemoteRun | None:
        """A live stream of another node, for a client resuming it here."""
        try:
            owner = await self.cluster.signals.owner_of_stream(stream_id)
        except ClusterUnavailable:
            return None
        if owner is None or owner == self.cluster.identity.incarnation:
            return None
        return _RemoteRun(self, owner, stream_id)

    async def stop(self, stream_id: str, note: str | None) -> str | None:
        """A supervisor's stop, wherever the stream runs; None if it is not live anywhere."""
        finish = await self.hub.stop(stream_id, note)
        if finish is not None:
            return finish
        signals = self.cluster.signals
        try:
            owner = await signals.owner_of_stream(stream_id)
            if owner is None or owner == self.cluster.identity.incarnation:
                return None
            answer = await signals.request(
                owner,
                "stop",
                {"streamId": stream_id, "note": note},
                answer_within=ANSWER_WITHIN_S,
            )
        except ClusterUnavailable as exc:
            raise busy(exc) from None
        if answer is None:
            raise busy(ClusterUnavailable("the stream's node did not answer", retry_after=2))
        reason = answer.get("finishReason")
        return str(reason) if reason is not None else None

    async def end_session(self, session_id: str) -> None:
        """End the session's live stream wherever it runs; return once it is settled."""
        if self.hub.for_session(session_id) is not None:
            await self.hub.end_session_streams(session_id)
            return
        signals = self.cluster.signals
        try:
            holder = await signals.owner_of_session(session_id)
            if holder is None or holder[0] == self.cluster.identity.incarnation:
                await self.hub.end_session_streams(session_id)
                return
            await signals.request(
                holder[0], "end-session", {"sessionId": session_id}, answer_within=ANSWER_WITHIN_S
            )
        except ClusterUnavailable as exc:
            raise busy(exc) from None

    async def observers_elsewhere(self, stream_id: str) -> int:
        """A stream's observers on the other nodes; 0 while Redis is away (a count
        is not worth refusing a join for)."""
        try:
            return await self.cluster.registry.observers_elsewhere(stream_id)
        except ClusterUnavailable:
            return 0

    async def active(self) -> list[dict[str, Any]]:
        """``GET /api/chat/streams/active``: the whole cluster's live streams."""
        try:
            rows = await self.cluster.registry.active()
        except ClusterUnavailable as exc:
            raise busy(exc) from None
        local = {run.stream_id: run for run in self.hub.live()}
        out = []
        for row in rows:
            info = row.info
            run = local.get(info.stream_id)
            out.append(
                {
                    "sessionId": info.session_id,
                    "streamingSessionId": info.stream_id,
                    "userId": info.user_id,
                    "modelId": info.model_id,
                    "startedAt": info.started_at,
                    # This node's own count is current; others' are at most a second old.
                    "observers": row.observers
                    - self._observers_told.get(info.stream_id, 0)
                    + run.stream.observers
                    if run is not None
                    else row.observers,
                    "node": info.node_id,
                }
            )
        return out

    async def rate(self, key: str) -> float:
        """The cluster-wide rate limit; this process's own while Redis is away."""
        try:
            return await self.cluster.limiter.take(key)
        except ClusterUnavailable:
            return self._local_limits.take(key)
