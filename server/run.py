"""One model call, from its upstream stream to its settled end: :class:`StreamRun`.

Created by :meth:`server.streams.StreamHub.start` (which checks, claims,
reserves and stores the user turn) and run as a task in the hub's nursery,
under its own cancel scope:

- the client's HTTP response is only a *reader* of the run's observation
  ring; when the client goes away its reader detaches and the run's cancel
  scope gets a deadline of now + ``CHINWAG_DISCONNECT_GRACE_MS`` (0: cancel
  at once). A resume re-attaches and lifts the deadline. The grace is a
  deadline on the scope, not a sleeping task;
- cancellation reaches the provider's ``async with``, which closes the
  upstream connection;
- the ending (the bill and its one database hop, :mod:`server.endings`;
  then ``done`` and the ring closed) runs in a ``finally`` under a
  shielded scope with a deadline, so a disconnect, an upstream error or a
  shutdown never leaves credits reserved or a message half written. In
  cluster mode the node first asks Redis whether the stream is still its
  own (a survivor may have taken it).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import trio

import ledger
from observation import Stream

from .auth import Principal
from .dialects import CHAT, Dialect, Ending
from .endings import (
    InternalFailure,
    NodeLostError,
    NotConfirmed,
    NotRecorded,
    Outcome,
    bill,
    told,
)
from .models import ModelInfo
from .providers.base import (
    ModelRequest,
    Provider,
    ProviderError,
    Started,
    Stop,
    TextDelta,
    Usage,
    request_tokens,
    storable,
)

if TYPE_CHECKING:
    from .cluster import Admission
    from .push import Push
    from .streams import StreamHub

log = logging.getLogger("chinwag.streams")

#: Bound on the shielded ending of a run (persist, settle, tell readers).
CLEANUP_TIMEOUT_S = 5.0
#: Of which storing the ending gets at most this (a database thread that is
#: already running still finishes: it cannot be interrupted)...
RECORD_S = 3.0
#: ... and telling the readers, after it, this, in a shielded scope of its own:
#: whatever the database did, they get their closing events.
TELL_S = 3.0
#: How long the closing events wait, together, for a client a whole ring behind.
FINAL_WAIT_S = 1.0
#: How long a streaming run waits for its client's response to start reading.
ATTACH_TIMEOUT_S = 10.0


class StreamRun:
    """One model call. Created by :meth:`StreamHub.start`; runs in the hub's nursery."""

    def __init__(
        self,
        hub: StreamHub,
        *,
        principal: Principal,
        session_id: str,
        model: ModelInfo,
        request: ModelRequest,
        reservation: ledger.Reservation,
        user_message: dict[str, Any],
        assistant_message: dict[str, Any],
        stream: Stream,
        streaming: bool,
        dialect: Dialect = CHAT,
        admission: Admission | None = None,
    ) -> None:
        self.hub = hub
        self.stream_id = stream.stream_id
        self.user_id = principal.user_id
        self.session_id = session_id
        self.model = model
        self.request = request
        self.reservation = reservation
        self.user_message = user_message
        self.assistant_message = assistant_message
        self.stream = stream
        self.dialect = dialect
        self.started_at = time.time()
        self._t0 = trio.current_time()
        self.first_token_at: float | None = None
        self.cancel_scope = trio.CancelScope()
        self.cancel_reason = "client_disconnected"
        #: A supervisor's words when they stopped it (SPEC §6.1), kept with the message.
        self.cancel_note: str | None = None
        self.outcome: Outcome | None = None
        #: Cluster mode: the session claim held in Redis, and where events are copied.
        self.admission = admission
        self.publisher = hub.link.publisher if hub.link is not None else None
        #: The client's response while it is attached on this node (see attach).
        self.push: Push | None = None
        #: When the run was told to stop (:meth:`cancel`); None until then.
        self.stop_requested_at: float | None = None
        self._done = trio.Event()
        self._attached = trio.Event()
        if not streaming:
            self._attached.set()

    # -- the client side ---------------------------------------------------------

    def attach(self, push: Push | None = None) -> None:
        """The client (or a resumed client) is reading: lift any disconnect deadline.

        ``push``: the client's response on this node, which the run then
        writes itself after each publish (:mod:`server.push`). Without one
        (a client resumed on another node: server.clustering) the run's own
        push, if any, stays.
        """
        if push is not None:
            self.push = push
        self._attached.set()
        if not self._done.is_set():
            self.cancel_scope.deadline = math.inf

    def detach(self, push: Push | None = None) -> None:
        """The client went away: abort after the grace (0 = at once)."""
        if push is not None and self.push is push:
            self.push = None
        if self._done.is_set() or self.cancel_scope.cancel_called:
            return  # ending already, for its own reason (a stop cuts a stalled client)
        grace = self.hub.settings.disconnect_grace_ms / 1000
        if grace <= 0:
            self.cancel("client_disconnected")
        else:
            self.cancel_reason = "client_disconnected"
            self.cancel_scope.deadline = trio.current_time() + grace

    def cancel(self, reason: str, note: str | None = None) -> None:
        """End the run now as ``reason`` (the first reason given wins)."""
        if not self._done.is_set() and not self.cancel_scope.cancel_called:
            self.cancel_reason = reason
            self.cancel_note = note
            self.stop_requested_at = trio.current_time()
            push = self.push
            if push is not None:  # a write of ours in flight is finished first
                push.shield_write()
            self.cancel_scope.cancel()
            if push is not None:  # it watches for a write of ours stuck on its client
                push.wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait_done(self) -> None:
        await self._done.wait()

    async def result(self) -> Outcome:
        """Wait for the end (non-streaming callers). If the caller is cancelled, so is the run."""
        try:
            await self._done.wait()
        finally:
            if not self._done.is_set():
                self.detach()
        assert self.outcome is not None
        return self.outcome

    # -- the work ------------------------------------------------------------------

    async def run(self, provider: Provider) -> None:
        parts: list[str] = []
        usage: Usage | None = None
        finish: str | None = None
        error: ProviderError | None = None
        retries = 0
        try:
            with self.cancel_scope:
                with trio.move_on_after(ATTACH_TIMEOUT_S) as attach_wait:
                    await self._attached.wait()
                if attach_wait.cancelled_caught:
                    return
                # Once per stream, not per token (the loop below runs per event).
                chunk, publish = self.dialect.chunk, self.stream.publish_nowait
                publisher, stream_id = self.publisher, self.stream_id
                async with provider.stream(self.request) as events:
                    # Innermost: shielded by cancel() while a client write is in flight
                    # (Push.shield_write).
                    with trio.CancelScope() as writes:
                        async for event in events:
                            if isinstance(event, TextDelta):
                                text = event.text
                                if not parts:
                                    self.first_token_at = trio.current_time()
                                parts.append(text)
                                name, data = chunk(text)
                                try:
                                    published = publish(name, data)
                                except trio.WouldBlock:
                                    # The client is a whole ring behind: wait for room.
                                    await self._publish_waiting(name, data)
                                    continue
                                if publisher is not None:  # cluster mode: for Redis too
                                    publisher.add(stream_id, published.id, name, data, tokens=1)
                                if (
                                    not event.more
                                    and (push := self.push) is not None
                                    and self.stop_requested_at is None
                                ):
                                    # The client's bytes, written by this task: no second
                                    # wake-up. A run of tokens already due (``more``) goes
                                    # in one write, after its last; none after a stop.
                                    await push.write(writes)
                            elif isinstance(event, Usage):
                                usage = event
                            elif isinstance(event, Stop):
                                finish = event.reason
                            elif isinstance(event, Started):
                                retries = event.retries
        except ProviderError as exc:
            error, finish, retries = exc, "error", max(retries, exc.retries)
        except Exception as exc:  # a bug must end this stream, not the hub
            log.exception("stream %s failed", self.stream_id)
            error, finish = InternalFailure(repr(exc)), "error"
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S):
                try:
                    await self._finish(
                        storable("".join(parts)),  # whatever a provider let through
                        len(parts),
                        usage,
                        finish or self.cancel_reason,
                        error,
                        retries,
                    )
                except Exception:
                    # Never let one stream's ending take the hub (and every stream) down.
                    # What could not be settled stays reserved until the next start-up
                    # releases it; the message stays "streaming" until then too.
                    log.exception("stream %s: could not persist/settle", self.stream_id)

    async def _publish_waiting(self, name: str, data: str) -> None:
        """Publish a chunk once the client, a whole ring behind, makes room — but
        not forever.

        A client whose reader has not moved for
        ``CHINWAG_SLOW_CLIENT_TIMEOUT_MS`` is treated as gone: the run ends
        as ``client_disconnected`` (the kernel's TCP_USER_TIMEOUT frees its
        connection on the same bound; see :mod:`server.serving`).
        """
        # Perhaps only what this run held back for one write (a run of due
        # tokens, or since a stop) is missing: have it written first.
        self._flush_held()
        with trio.move_on_after(self.hub.settings.slow_client_timeout_ms / 1000):
            event = await self.stream.publish(name, data)
            if self.publisher is not None:
                self.publisher.add(self.stream_id, event.id, name, data, tokens=1)
            return
        log.warning("stream %s: client stopped reading, ending it", self.stream_id)
        self.cancel("client_disconnected")
        await trio.lowlevel.checkpoint()  # deliver the cancellation now

    def _flush_held(self) -> None:
        """Have the client's response write what this run has not (never waits)."""
        if self.push is not None:
            self.push.wake()

    async def _finish(
        self,
        content: str,
        produced: int,
        usage: Usage | None,
        finish_reason: str,
        error: ProviderError | None,
        retries: int,
    ) -> None:
        """Persist, settle, then tell readers. Runs shielded, bounded, exactly once.

        In cluster mode the node first asks Redis whether it still owns the
        stream; it gives the session claim back before ``done`` goes out and
        takes the stream off the cluster's live list last.
        """
        hub = self.hub
        link = hub.link
        owner = released = ending_here = False
        final = 0  # closing events published
        try:
            charges = bill(
                stream_id=self.stream_id,
                user_id=self.user_id,
                model=self.model,
                provider=hub.provider.name if hub.provider else "",
                produced=produced,
                usage=usage,
                request_input=self.reservation_input,
                finish_reason=finish_reason,
                error=error,
                retries=retries,
                ttft_ms=None
                if self.first_token_at is None
                else (self.first_token_at - self._t0) * 1000,
                total_ms=(trio.current_time() - self._t0) * 1000,
            )
            status, input_tokens, output_tokens = (
                charges.status,
                charges.input_tokens,
                charges.output_tokens,
            )
            ending_here = link is None or await link.owns_ending(self.stream_id)
            if ending_here:
                owner = True
                stored, known = await charges.record(
                    hub.db,
                    message_id=self.assistant_message["id"],
                    reservation_id=self.reservation.id,
                    content=content,
                    note=self.cancel_note,
                    within=RECORD_S,
                )
                if stored is None:
                    # Nothing of it was stored (or the database would not say in time):
                    # the message stays "streaming" and the reservation held until the
                    # hub ends both without this run, once the database answers again
                    # (hub.abandoned, every few seconds), or recovery does (the next
                    # start-up; in cluster mode a survivor: the stream stays on the
                    # node's live list until then). Either charges nothing, unless
                    # the database did store it. Readers are told so.
                    owner = False  # not `finished`: ended later, and found until then
                    charged, finish_reason, status = 0, "error", "interrupted"
                    error = NotRecorded() if known else NotConfirmed()
                    hub.abandoned.later(self.stream_id, self.user_id, content)
                elif (stored.status, stored.finish_reason) == (status, finish_reason):
                    charged = stored.charged
                    hub.telemetry.count(charges.charged(charged))
                else:  # someone else ended it first (a survivor): told as stored
                    owner, error, charged = False, NodeLostError(), stored.charged
                    status, finish_reason = stored.status, stored.finish_reason
            else:
                # A survivor took the stream over and settled it: the database is its.
                log.warning("stream %s: taken over by a survivor; not settling", self.stream_id)
                charged, finish_reason, status = 0, "error", "interrupted"
                error = NodeLostError()
            self.assistant_message = {
                **self.assistant_message,
                "content": content,
                "status": status,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "tokens_used": input_tokens + output_tokens,
                "credits_charged": charged,
                "finish_reason": finish_reason,
            }
            if error is None:  # an ending the server chose: a stop, a shutdown
                error = told(finish_reason)
            self.outcome = Outcome(
                self.user_message,
                self.assistant_message,
                input_tokens,
                output_tokens,
                charged,
                finish_reason,
                retries,
                error,
            )
            ending = Ending(
                stream_id=self.stream_id,
                message_id=self.assistant_message["id"],
                model_id=self.model.id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                credits_charged=charged,
                cost_usd=round(charged * hub.settings.credit_usd, 8),
                finish_reason=finish_reason,
                error=error,
            )
            # Readers are told whatever the database did, in a time of their own.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + TELL_S):
                if link is not None and ending_here:  # before `done`: the client may go on
                    await link.release(self.admission)
                    released = True
                final = await self._publish_final(self.dialect.ending(ending))
        finally:
            # The ending outlives the ring's release: a late observer still gets it.
            self.stream.close(ending=final)
            if self.push is not None:  # it writes the closing events and ends the response
                self.push.wake()
            hub._forget(self)
            try:
                if link is not None:
                    try:
                        if not released:  # compare-and-delete: harmless if a survivor freed it
                            await link.release(self.admission)
                    finally:  # past the deadline both are queued for housekeeping
                        if owner:
                            await link.finished(self.stream_id)
            finally:
                self._done.set()

    async def _publish_final(self, events: list[tuple[str, str]]) -> int:
        """The closing events: a client that stalled gets them if it catches up
        within :data:`FINAL_WAIT_S` (one bound for all of them, not one each).
        Returns how many were published."""
        publisher = self.publisher
        published = 0
        try:
            with trio.move_on_after(FINAL_WAIT_S):
                for name, data in events:
                    try:
                        event = self.stream.publish_nowait(name, data)
                    except trio.WouldBlock:
                        self._flush_held()
                        event = await self.stream.publish(name, data)
                    published += 1
                    if publisher is not None:
                        publisher.add(self.stream_id, event.id, name, data)
        finally:
            if publisher is not None:
                publisher.end(self.stream_id, ending=published)
        return published

    @property
    def reservation_input(self) -> int:
        return request_tokens(self.request)
