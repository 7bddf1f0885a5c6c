"""The life of one model call: reserve → flush → upstream → publish → persist → settle.

A :class:`StreamHub` is a long-lived service that owns one nursery (started
in the app nursery). Every model call — streaming or not — is a
:class:`~server.run.StreamRun` task in that nursery (the call itself, from
upstream to its settled end, is in :mod:`server.run`), so no task outlives
its stream, and the hub (so the app) owns every task. The hub decides
whether a call may start at all (one stream per chat session, the per-user
and per-process caps; in cluster mode the same cluster-wide, through
:class:`~server.clustering.ClusterLink`), reserves and stores the user turn
before the run starts, and stops runs: a supervisor's stop, a deleted
session, a shutdown.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import trio

import ledger
from observation import ObservationManager

from .abandoned import Abandoned
from .auth import Principal
from .db import TRANSIENT, Db
from .dialects import CHAT, Dialect
from .endings import InternalFailure, NodeLostError, Outcome, ServerShutdown, StreamCancelled
from .errors import ApiError, Conflict, TooMany
from .models import ModelInfo
from .providers.base import (
    ChatTurn,
    ModelRequest,
    Pace,
    Provider,
    request_tokens,
)
from .run import CLEANUP_TIMEOUT_S, FINAL_WAIT_S, StreamRun
from .settings import Settings
from .storage import StoreBackend, StoreError
from .telemetry import Telemetry

__all__ = [
    "CLEANUP_TIMEOUT_S",
    "FINAL_WAIT_S",
    "InternalFailure",
    "NodeLostError",
    "Outcome",
    "ServerShutdown",
    "StreamCancelled",
    "StreamHub",
    "StreamRun",
    "new_stream_id",
]

if TYPE_CHECKING:
    from .clustering import ClusterLink

DEFAULT_MAX_TOKENS = 1024
HISTORY_TURNS = 20


log = logging.getLogger("chinwag.streams")


def _may_have_committed(exc: BaseException) -> bool:
    """Might the open that raised ``exc`` be stored after all? Yes for a database
    that failed or went away mid-commit (and for a bug: better checked); no for
    a refusal (insufficient credits, an unknown account, a store's own error),
    which rolled the transaction back, and for what is not an error."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, ledger.LedgerError | StoreError)


def new_stream_id() -> str:
    return f"stream-{int(time.time() * 1000)}-{uuid.uuid4()}"


def _turns(history: list[dict[str, Any]], text: str) -> tuple[ChatTurn, ...]:
    """Earlier turns (``history``, oldest first) plus this one, alternating, user first."""
    turns: list[ChatTurn] = []
    for row in history:
        if not row["content"] or row["role"] not in ("user", "assistant"):
            continue
        if turns and turns[-1].role == row["role"]:
            turns[-1] = ChatTurn(row["role"], turns[-1].text + "\n\n" + row["content"])
        else:
            turns.append(ChatTurn(row["role"], row["content"]))
    while turns and turns[0].role != "user":
        turns.pop(0)
    if turns and turns[-1].role == "user":
        turns[-1] = ChatTurn("user", turns[-1].text + "\n\n" + text)
    else:
        turns.append(ChatTurn("user", text))
    return tuple(turns)


class StreamHub:
    """Owns every :class:`StreamRun`; enforces one stream per chat session and the caps."""

    def __init__(
        self,
        settings: Settings,
        db: Db,
        observations: ObservationManager,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.db = db
        self.observations = observations
        self.provider: Provider | None = None
        #: Cluster mode (CHINWAG_REDIS_URL): set by the app once it has joined.
        self.link: ClusterLink | None = None
        self._nursery: trio.Nursery | None = None
        self._by_session: dict[str, StreamRun] = {}
        self._by_stream: dict[str, StreamRun] = {}
        self._per_user: dict[str, int] = {}  # live and opening, per user
        self._opening: set[str] = set()  # chat sessions whose stream is being opened
        self._opened = trio.lowlevel.ParkingLot()  # unparked as each opening ends
        self.accepting = True
        #: Streams the database could not end, ended without their run.
        self.abandoned = Abandoned(db)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.abandoned.run)
            task_status.started()
            await trio.sleep_forever()

    # -- queries -------------------------------------------------------------------

    def live(self) -> list[StreamRun]:
        return list(self._by_session.values())

    def busy_sessions(self) -> set[str]:
        """Chat sessions with a live stream here, or one being opened."""
        return {*self._by_session, *self._opening}

    def for_session(self, session_id: str) -> StreamRun | None:
        return self._by_session.get(session_id)

    def for_stream(self, stream_id: str) -> StreamRun | None:
        return self._by_stream.get(stream_id)

    # -- starting ------------------------------------------------------------------

    async def start(
        self,
        who: Principal,
        session: dict[str, Any],
        text: str,
        model: ModelInfo,
        *,
        max_tokens: int | None,
        temperature: float | None,
        scenario: str | None,
        pace: Pace | None = None,
        streaming: bool = False,
        dialect: Dialect = CHAT,
        context: str | None = None,
    ) -> StreamRun:
        """Check, reserve, store the user turn and start the run.

        Everything that can refuse the call happens here, before anything is
        stored, and fails as a plain :class:`ApiError`; nothing is charged or
        written for a refused call. ``context`` (recalled memory, say) goes
        to the model as its system text and is reserved for like the input.

        The chat session's slot (and the user's and the process's counts) is
        claimed before the first await, so two calls racing on one session
        cannot both pass the check. The writes (account, reservation, both
        messages) are one transaction, shielded: once started it commits
        and the run starts, even if the caller is cancelled meanwhile (the
        run then ends on its own when no client attaches); a refused
        reservation writes nothing. On SQLite it is a light moment
        (:meth:`Db.write`): on the loop when the writer is idle.
        """
        if self._nursery is None or self.provider is None or not self.accepting:
            raise ApiError(
                "The server is starting or stopping.",
                status=503,
                error_code="SERVER_BUSY",
                headers={"Retry-After": "1"},
            )
        session_id = session["id"]
        if session_id in self._by_session or session_id in self._opening:
            raise Conflict(
                "A stream is already active on this chat session.",
                error_code="STREAM_ALREADY_ACTIVE",
            )
        if self._per_user.get(who.user_id, 0) >= self.settings.max_streams_per_user:
            raise TooMany(
                "Too many concurrent streams for this user.", error_code="TOO_MANY_STREAMS"
            )
        if len(self._by_session) + len(self._opening) >= self.settings.max_streams:
            raise ApiError(
                "The server is at capacity, please retry shortly.",
                status=503,
                error_code="SERVER_BUSY",
                headers={"Retry-After": "1"},
            )
        self._opening.add(session_id)
        self._per_user[who.user_id] = self._per_user.get(who.user_id, 0) + 1
        try:
            try:
                run = await self._open(
                    who,
                    session_id,
                    text,
                    model,
                    max_tokens,
                    temperature,
                    scenario,
                    pace,
                    streaming,
                    dialect,
                    context,
                )
            except BaseException:
                self._uncount(who.user_id)
                raise
            finally:
                self._opening.discard(session_id)
            self._by_session[session_id] = run
            self._by_stream[run.stream_id] = run
            assert self._nursery is not None
            self._nursery.start_soon(run.run, self.provider, name=f"stream {run.stream_id}")
            if not self.accepting:  # a shutdown began while this one was opening
                run.cancel("shutdown")
        finally:
            self._opened.unpark_all()  # a shutdown waits for openings (see shutdown)
        return run

    async def _open(
        self,
        who: Principal,
        session_id: str,
        text: str,
        model: ModelInfo,
        max_tokens: int | None,
        temperature: float | None,
        scenario: str | None,
        pace: Pace | None,
        streaming: bool,
        dialect: Dialect,
        context: str | None,
    ) -> StreamRun:
        history = await self.db.store.recent_messages(session_id, HISTORY_TURNS)
        max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, model.max_tokens)
        request = ModelRequest(
            model_id=model.id,
            messages=_turns(history, text),
            max_tokens=max_tokens,
            temperature=temperature,
            system=context,
            scenario=scenario,
            pace=pace,
        )
        stream_id = new_stream_id()
        amount = model.price.worst_case(request_tokens(request), max_tokens)
        user_id = who.user_id

        def open_rows(
            store: StoreBackend, book: ledger.LedgerBackend
        ) -> tuple[ledger.Reservation, dict[str, Any], dict[str, Any]]:
            # One transaction (the store and the ledger share the database: Db.open).
            return store.open_turn(
                session_id,
                user_id,
                text=text,
                model_id=model.id,
                streaming_session_id=stream_id,
                reserve=book.reservation(
                    user_id, amount, model_id=model.id, streaming_session_id=stream_id
                ),
            )

        link, admission = self.link, None
        if link is not None:  # cluster-wide: the session's claim, the user's cap, the registry
            admission = await link.admit(
                stream_id=stream_id,
                session_id=session_id,
                user_id=user_id,
                model_id=model.id,
                dialect=dialect,
                input_tokens=request_tokens(request),
            )
        try:
            with trio.CancelScope(shield=True):
                # Light: no commit in it waits for the disk (a reservation's does not).
                reservation, user_msg, assistant_msg = await self.db.write(open_rows, light=True)
        except BaseException as exc:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S):
                # A failed commit may have happened all the same: whatever of this
                # open is stored is undone, at once but without keeping the
                # refused caller waiting (a database that is away would).
                stored = _may_have_committed(exc)
                if stored:
                    self.abandoned.later(stream_id, user_id)
                if link is not None:
                    await link.release(admission)
                    if not stored:  # else once ended (abandoned.on_ended): a survivor
                        await link.finished(stream_id)  # finds it live if this node dies
            raise
        stream = self.observations.open_stream(stream_id, group=session_id, info=dialect)
        return StreamRun(
            self,
            principal=who,
            session_id=session_id,
            model=model,
            request=request,
            reservation=reservation,
            user_message=user_msg,
            assistant_message=assistant_msg,
            stream=stream,
            streaming=streaming,
            dialect=dialect,
            admission=admission,
        )

    def _forget(self, run: StreamRun) -> None:
        self._by_stream.pop(run.stream_id, None)
        if self._by_session.get(run.session_id) is run:
            del self._by_session[run.session_id]
            self._uncount(run.user_id)

    def _uncount(self, user_id: str) -> None:
        left = self._per_user.get(user_id, 1) - 1
        if left > 0:
            self._per_user[user_id] = left
        else:
            self._per_user.pop(user_id, None)

    # -- ending --------------------------------------------------------------------

    async def end_session_streams(self, session_id: str) -> None:
        """End the live run on a chat session (if any) and wait until it is settled;
        one being opened is waited for first (its open commits whatever happens)."""
        while session_id in self._opening:
            await self._opened.park()
        run = self._by_session.get(session_id)
        if run is not None:
            run.cancel("client_disconnected")
            await run.wait_done()

    async def stop(self, stream_id: str, note: str | None) -> str | None:
        """A supervisor's stop (SPEC §6.1): end the run as ``cancelled``, wait until settled.

        None if no run with that id is live. The answer is how the run really
        ended: ``cancelled``, unless it had already ended on its own first.
        The stop stands even if the caller is cancelled while waiting.
        """
        run = self._by_stream.get(stream_id)
        if run is None:
            return None
        run.cancel("cancelled", note)
        await run.wait_done()
        return run.outcome.finish_reason if run.outcome else run.cancel_reason

    async def shutdown(self) -> None:
        """Stop every run (``finishReason: shutdown``) and wait until all are settled,
        those that were still opening included (they start already told to stop)."""
        self.accepting = False
        while self._by_stream or self._opening:
            runs = list(self._by_stream.values())
            for run in runs:
                run.cancel("shutdown")
            for run in runs:
                await run.wait_done()
            if self._opening:  # each one started meanwhile is stopped on the next turn
                await self._opened.park()
        # One last try for what the database could not end (the rest is recovery's).
        if self.abandoned.queued:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S):
                await self.abandoned.try_all()
