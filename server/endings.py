"""How a model call ends: what it is charged, what is stored, what its readers are told.

:class:`server.run.StreamRun` streams; this module is its ending's
arithmetic and records:

- :func:`bill` turns what the run produced into a :class:`Bill`: only
  produced tokens are charged (a call that produced nothing costs nothing),
  the stored status follows from the finish reason, and
  :meth:`Bill.record` is the one database hop that stores the message,
  settles the reservation and adds the telemetry row together, bounded in
  time, and says what is stored (reading it back when a try's answer was
  lost);
- :func:`told` is the error every reader hears when the server chose the
  ending (a shutdown, a supervisor's stop), before ``done``;
- :class:`Outcome` is what a non-streaming caller gets back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

import ledger

from .models import ModelInfo
from .providers.base import ProviderError, Usage
from .storage import StoreBackend
from .telemetry import CallRecord, Telemetry

if TYPE_CHECKING:
    from .db import Db

log = logging.getLogger("chinwag.streams")


class ServerShutdown(ProviderError):
    """Told to readers of a stream the server ended because it is stopping."""

    error_code = "SERVER_SHUTTING_DOWN"
    user_message = "The server is shutting down, please reconnect shortly."


class StreamCancelled(ProviderError):
    """Told to every reader of a stream a supervisor stopped (SPEC §6.1)."""

    error_code = "STREAM_CANCELLED"
    user_message = "This answer was stopped by a supervisor."


class NodeLostError(ProviderError):
    """Told to the readers of a stream whose node died, or was taken for dead (SPEC §9)."""

    error_code = "NODE_LOST"
    user_message = "The server running this answer stopped; please send the message again."


class NotRecorded(ProviderError):
    """Told to the readers of a stream whose ending the database would not take."""

    error_code = "INTERNAL_ERROR"
    user_message = "This answer could not be saved; it was not charged."


class NotConfirmed(ProviderError):
    """Told to the readers of a stream whose ending the database would not confirm in time."""

    error_code = "INTERNAL_ERROR"
    user_message = (
        "This answer could not be confirmed as saved; any charge will show in your usage."
    )


class InternalFailure(ProviderError):
    """A bug ended this stream; it is logged, the client sees only this."""

    error_code = "INTERNAL_ERROR"
    user_message = "Internal server error."


#: The stored message status for each way a run ends (anything else: interrupted).
_STATUS = {"stop": "complete", "length": "complete", "error": "error", "cancelled": "cancelled"}
#: Endings the server chose, told to every reader as an error event before ``done``.
_TOLD: dict[str, type[ProviderError]] = {
    "shutdown": ServerShutdown,
    "cancelled": StreamCancelled,
}


def told(finish_reason: str) -> ProviderError | None:
    """The error readers are told for an ending the server chose; None for the others."""
    kind = _TOLD.get(finish_reason)
    return kind() if kind is not None else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended, once its message and its charge are committed."""

    user_message: dict[str, Any]
    assistant_message: dict[str, Any]
    input_tokens: int
    output_tokens: int
    credits_charged: int
    finish_reason: str
    retries: int
    error: ProviderError | None


@dataclass(frozen=True, slots=True)
class Bill:
    """What one ended call costs and how it is recorded (see :func:`bill`): its
    telemetry record (the tokens and the charge are that record's) and the
    message's stored status."""

    status: str
    call: CallRecord

    @property
    def input_tokens(self) -> int:
        return self.call.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.call.output_tokens

    @property
    def charge(self) -> int:
        return self.call.credits_charged

    def write(
        self, *, message_id: str, reservation_id: str, content: str, note: str | None
    ) -> Callable[[StoreBackend, ledger.LedgerBackend], ledger.Settlement]:
        """The database hop (:meth:`server.db.Db.write`): the settlement, the
        message and the telemetry row, in one transaction (``StoreBackend.close_turn``):
        all of them or none, so it may be tried again. The message and the row
        carry what the ledger really charged: a charge above the reservation
        is capped at it (``LedgerBackend.settle``)."""
        call = self.call

        def end(store: StoreBackend, book: ledger.LedgerBackend) -> ledger.Settlement:
            return store.close_turn(
                message_id,
                settle=book.settlement(
                    reservation_id,
                    self.charge,
                    model_id=call.model_id,
                    streaming_session_id=call.streaming_session_id,
                    input_tokens=self.input_tokens,
                    output_tokens=self.output_tokens,
                ),
                content=content,
                status=self.status,
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                finish_reason=call.finish_reason,
                cancel_reason=note,
                telemetry=lambda charged: Telemetry.row(self.charged(charged)),
            )

        return end

    async def record(
        self,
        db: Db,
        *,
        message_id: str,
        reservation_id: str,
        content: str,
        note: str | None,
        within: float,
    ) -> tuple[Stored | None, bool]:
        """Store the ending (:meth:`write`, tried again after a transient failure)
        within ``within`` seconds: what is stored, and whether that is known.

        ``(None, True)``: nothing was stored (the message is still "streaming");
        ``(None, False)``: the database would not say in time (logged). A
        reservation found settled means the ending was stored already: by a try
        whose commit went through but whose answer was lost (a connection
        dropped in ``COMMIT``), or by someone else (a cluster survivor); and a
        failed last try may have committed too: both are read back. A write
        already in a database thread is not interrupted: it finishes first.
        """
        end = self.write(
            message_id=message_id, reservation_id=reservation_id, content=content, note=note
        )
        stream_id = self.call.streaming_session_id
        # Shielded, with a deadline of its own: the caller's ending may be past its
        # own deadline by the time a slow try returns; this bound is the one that
        # applies, and it ends here, never in the caller's telling of readers.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + within):
            try:
                settled = await db.write_retried(end)
                return Stored(self.status, self.call.finish_reason, settled.charged), True
            except Exception as exc:
                if not isinstance(exc, ledger.ReservationClosed):
                    log.exception("stream %s: could not record its ending", stream_id)
            try:
                return await self.stored(db), True
            except Exception as exc:
                log.warning("stream %s: could not read its ending back: %r", stream_id, exc)
                return None, False
        log.error("stream %s: its ending was not recorded within %g s", stream_id, within)
        return None, False

    async def stored(self, db: Db) -> Stored | None:
        """The ending of this bill's stream as stored; None while it has none."""
        return await db.read(_stored, self.call.streaming_session_id)

    def charged(self, credits: int) -> CallRecord:
        """The telemetry record with the credits the ledger settled."""
        if credits == self.call.credits_charged:
            return self.call
        return replace(self.call, credits_charged=credits)


@dataclass(frozen=True, slots=True)
class Stored:
    """An ending as stored: the message's status, its finish reason, the credits charged."""

    status: str
    finish_reason: str
    charged: int


def _stored(store: StoreBackend, _book: Any, stream_id: str) -> Stored | None:
    """The ending of the stream's message as stored; None while it has none."""
    row = store.message_by_stream(stream_id)
    if row is None or row["status"] == "streaming" or row["finish_reason"] is None:
        return None
    return Stored(row["status"], row["finish_reason"], row["credits_charged"])


def bill(
    *,
    stream_id: str,
    user_id: str,
    model: ModelInfo,
    provider: str,
    produced: int,
    usage: Usage | None,
    request_input: int,
    finish_reason: str,
    error: ProviderError | None,
    retries: int,
    ttft_ms: float | None,
    total_ms: float,
) -> Bill:
    """The bill of a call that ended as ``finish_reason`` after ``produced`` tokens.

    The upstream's own ``usage`` counts when it came; else the tokens
    produced, and the request's estimated input. Only produced tokens are
    charged: a call that produced nothing costs (and records) nothing.
    """
    output_tokens = usage.output_tokens if usage else produced
    input_tokens = usage.input_tokens if usage else request_input
    charge = model.price.cost(input_tokens, output_tokens) if output_tokens else 0
    if not output_tokens:
        input_tokens = 0
    call = CallRecord(
        streaming_session_id=stream_id,
        user_id=user_id,
        model_id=model.id,
        provider=provider,
        retries=retries,
        ttft_ms=ttft_ms,
        total_ms=total_ms,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        credits_charged=charge,
        finish_reason=finish_reason,
        error_code=error.error_code if error else None,
    )
    return Bill(status=_STATUS.get(finish_reason, "interrupted"), call=call)
