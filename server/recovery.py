"""What a survivor does with a dead node's stream (SPEC §9), once.

:mod:`server.cluster.nodes` decides, in Redis, which survivor takes a dead
node over (exactly one) and hands it each of the node's streams;
:func:`settle_recovered` ends one in the database in one hop to the writer:

- its assistant message becomes ``interrupted`` with the text the cluster's
  copy holds (when the copy still starts at the first event; "" if Redis
  trimmed it), and the tokens the cluster saw produced;
- its reservation (looked up by stream id: the stream was registered before
  the reservation existed) is settled for those tokens, or for nothing if
  none were produced or if the owner had already told its readers ``done``
  (its ending could not be saved: they were told "not charged", and that
  stands);
- one telemetry row, ``errorCode`` ``NODE_LOST``;

all three in one transaction (``StoreBackend.close_turn``, as a run's own
ending), so an owner's ending that commits first wins whole;

and returns the closing events — ``error`` ``NODE_LOST`` and ``done``
``finishReason:"error"``, in the stream's own dialect — that the survivor
appends to the copy for observers and resuming clients. Idempotent: a
message no longer ``streaming`` and a reservation already closed are left
alone (the owner may have died mid-ending, or a retry may run it twice).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import ledger

from .cluster import ClusterRedis, RecoveredStream
from .db import Db
from .dialects import CHAT, DIALECTS, Ending
from .models import Catalog
from .storage import StoreBackend
from .streams import NodeLostError
from .telemetry import CallRecord, Telemetry

__all__ = ["settle_recovered"]

log = logging.getLogger("chinwag.cluster")


async def settle_recovered(
    stream: RecoveredStream,
    *,
    redis: ClusterRedis,
    db: Db,
    catalog: Catalog,
    credit_usd: float,
) -> list[tuple[str, str]]:
    """End ``stream`` in the database (once) and return its closing events."""
    model = catalog.get(stream.model_id)
    output = stream.tokens
    input_tokens = stream.input_tokens if output else 0
    told = stream.ended  # the owner's readers heard its ending: nothing charged
    charge = model.price.cost(input_tokens, output) if model and output and not told else 0
    content = await _content(redis, stream)
    call = CallRecord(
        streaming_session_id=stream.stream_id,
        user_id=stream.user_id,
        model_id=stream.model_id,
        provider="",
        retries=0,
        ttft_ms=None,
        total_ms=max(0.0, time.time() - stream.started_at) * 1000,
        input_tokens=input_tokens,
        output_tokens=output,
        credits_charged=charge,
        finish_reason="error",
        error_code=NodeLostError.error_code,
    )

    def work(store: StoreBackend, book: ledger.LedgerBackend) -> tuple[str, int]:
        message = store.message_by_stream(stream.stream_id)
        charged = int(message["credits_charged"]) if message else 0
        held = [
            r
            for r in book.open_reservations(stream.user_id)
            if r.streaming_session_id == stream.stream_id
        ]
        streaming = message is not None and message["status"] == "streaming"
        if held and message is not None and streaming:
            # The settlement, the message and the telemetry row in one transaction,
            # as a run's own ending: the owner's ending, if it commits first, makes
            # this one fail whole (ReservationClosed) and stands.
            try:
                return message["id"], store.close_turn(
                    message["id"],
                    settle=book.settlement(
                        held[0].id,
                        charge,
                        model_id=stream.model_id,
                        streaming_session_id=stream.stream_id,
                        input_tokens=input_tokens,
                        output_tokens=output,
                    ),
                    content=content,
                    status="interrupted",
                    input_tokens=input_tokens,
                    output_tokens=output,
                    finish_reason="error",
                    cancel_reason=None,
                    telemetry=lambda credits: Telemetry.row(replace(call, credits_charged=credits)),
                ).charged
            except ledger.ReservationClosed:
                stored = store.message_by_stream(stream.stream_id)
                return message["id"], int(stored["credits_charged"]) if stored else 0
        for reservation in held:  # no message left to end (its session was deleted)
            charged = book.settle(
                reservation.id,
                charge,
                model_id=stream.model_id,
                streaming_session_id=stream.stream_id,
                input_tokens=input_tokens,
                output_tokens=output,
            ).charged
        # Its reservation closed already (by the hub, say): the message is ended
        # once, unless someone got there first.
        if message is not None and streaming:
            ended_here = store.finish_message(
                message["id"],
                content=content,
                status="interrupted",
                input_tokens=input_tokens,
                output_tokens=output,
                credits_charged=charged,
                finish_reason="error",
                cancel_reason=None,
            )
            if ended_here:
                telemetry = Telemetry.row(replace(call, credits_charged=charged))
                store.add_telemetry("model_call", telemetry)
            else:  # its owner ended it since it was read: what it stored stands
                stored = store.message_by_stream(stream.stream_id)
                charged = int(stored["credits_charged"]) if stored else charged
        return (message["id"] if message else stream.message_id), charged

    message_id, charged = await db.write(work)
    log.warning(
        "recovered stream %s of node %s: %d tokens, %d credits charged",
        stream.stream_id,
        stream.node_id,
        output,
        charged,
    )
    return DIALECTS.get(stream.dialect, CHAT).ending(
        Ending(
            stream_id=stream.stream_id,
            message_id=message_id,
            model_id=stream.model_id,
            input_tokens=input_tokens,
            output_tokens=output,
            credits_charged=charged,
            cost_usd=round(charged * credit_usd, 8),
            finish_reason="error",
            error=NodeLostError(),
        )
    )


async def _content(redis: ClusterRedis, stream: RecoveredStream) -> str:
    """The answer's text as far as the cluster's copy holds it whole ("" if trimmed)."""
    with redis.guard("recovered content"):
        entries = await redis.client.xrange(redis.keys("stream", stream.stream_id))
    if not entries or entries[0].identifier not in (b"0-1", "0-1"):
        return ""
    parts = []
    for entry in entries:
        fields = entry.field_values
        if fields.get(b"n") in (b"chunk", b"token"):
            try:
                parts.append(json.loads(fields[b"d"])["text"])
            except (ValueError, KeyError, TypeError):
                return ""
    return "".join(parts)
