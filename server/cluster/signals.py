"""Cross-node signals: a stop, a session's deletion or a shutdown reaches the stream's node.

Each incarnation reads its own inbox, a Redis Stream ``inbox:<incarnation>``
(:meth:`Signals.run`); a sender appends a request there and waits on a
reply list of its own with ``BLPOP`` (:meth:`Signals.request`). A stream
inbox, rather than pub/sub, because it keeps what was sent while the
receiver was reconnecting: a signal is lost only if its target died, and
then the target's streams are recovered anyway (:mod:`server.cluster.nodes`).

The receiver runs the server's ``handler(kind, args) -> dict`` in a task of
its own per signal (a stop waits for the stream's settled end, others need
not wait for it) and pushes the handler's answer; the sender's call
returns it, so the caller's HTTP answer waits for the stream's settled end
exactly as on one node. The kinds the server handles:

- ``stop`` ``{"streamId", "note"}`` → ``{"finishReason": str | None}`` (SPEC §6.1);
- ``end-session`` ``{"sessionId"}`` → ``{}`` once its live stream has ended;
- ``shutdown`` ``{}`` → ``{}`` once the node's streams have ended.

Routing: :meth:`Signals.owner_of_stream` and :meth:`Signals.owner_of_session`
name the incarnation that runs a stream (from the registry and the session
claim). Every call raises ``ClusterUnavailable`` when Redis cannot be reached.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from coredis.tokens import PureToken

from .claims import parse_owner
from .nodes import Identity
from .publisher import RETRY_FIRST_S, RETRY_MAX_S
from .redis import ClusterRedis, ClusterUnavailable, text

__all__ = ["Handler", "Signals"]

log = logging.getLogger("chinwag.cluster.signals")

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

#: How long one blocking inbox read waits before looking again.
BLOCK_MS = 2_000
#: Inbox entries kept, and how long an inbox or an unread reply outlives its last write.
INBOX_LEN = 1_000
INBOX_TTL_MS = 3_600_000
REPLY_TTL_MS = 60_000


class Signals:
    """This incarnation's inbox, and requests to other nodes' (see the module docstring)."""

    def __init__(
        self, redis: ClusterRedis, identity: Identity, *, block_ms: int = BLOCK_MS
    ) -> None:
        self.redis = redis
        self.identity = identity
        self.block_ms = block_ms

    def _inbox(self, incarnation: str) -> str:
        return self.redis.keys("inbox", incarnation)

    # -- sending -------------------------------------------------------------------

    async def request(
        self, incarnation: str, kind: str, args: dict[str, Any], *, answer_within: float
    ) -> dict[str, Any] | None:
        """Ask ``incarnation`` to do ``kind`` and wait for its answer.

        None when that incarnation holds no lease (it is gone: recovery ends
        its streams) or did not answer within ``answer_within`` seconds. If the
        caller is cancelled, the signal stands (it was sent) and its answer
        is dropped. Raises ``ClusterUnavailable``.
        """
        client, keys = self.redis.client, self.redis.keys
        reply = keys("reply", secrets.token_hex(12))
        body = json.dumps({"kind": kind, "args": args, "reply": reply})
        with self.redis.guard("signal"):
            if not await client.exists([keys("node", incarnation)]):
                return None
            async with client.pipeline(transaction=False) as pipe:
                pipe.xadd(
                    self._inbox(incarnation),
                    {"s": body},
                    trim_strategy=PureToken.MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                    threshold=INBOX_LEN,
                )
                pipe.pexpire(self._inbox(incarnation), INBOX_TTL_MS)
        with self.redis.guard("signal reply", timeout=answer_within + 5):
            answer = await client.blpop([reply], timeout=max(0.01, answer_within))
        if answer is None:
            return None
        result: dict[str, Any] = json.loads(answer[1])
        return result

    async def owner_of_stream(self, stream_id: str) -> str | None:
        """The incarnation running a live stream, or None (not live, or unknown)."""
        with self.redis.guard("owner"):
            state, owner = await self.redis.client.hmget(
                self.redis.keys("stream", stream_id, "meta"), ["state", "incarnation"]
            )
        if owner is None or state not in (b"live", b"finishing"):
            return None
        return owner.decode()

    async def owner_of_session(self, session_id: str) -> tuple[str, str] | None:
        """``(incarnation, stream id)`` of the chat session's live stream, or None."""
        with self.redis.guard("owner"):
            value = await self.redis.client.get(self.redis.keys("session", session_id, "claim"))
        return parse_owner(value)

    # -- receiving -----------------------------------------------------------------

    async def run(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read this incarnation's inbox and answer each signal, until cancelled.

        Each signal runs ``handler`` in its own task (owned here); a handler
        that raises answers ``{"error": "<type>"}`` and is logged. Follows the
        identity to a new inbox if the node becomes a new incarnation.
        Redis trouble is logged and retried with a backoff.
        """
        async with trio.open_nursery() as nursery:
            task_status.started()
            incarnation, last = self.identity.incarnation, "0-0"
            backoff = RETRY_FIRST_S
            while True:
                if incarnation != self.identity.incarnation:
                    incarnation, last = self.identity.incarnation, "0-0"
                inbox = self._inbox(incarnation)
                try:
                    with self.redis.guard("inbox", timeout=self.block_ms / 1000 + 5):
                        reply = await self.redis.client.xread(
                            {inbox: last}, count=100, block=self.block_ms
                        )
                except ClusterUnavailable as exc:
                    log.warning("signals: %s", exc)
                    await trio.sleep(backoff)
                    backoff = min(RETRY_MAX_S, backoff * 2)
                    continue
                backoff = RETRY_FIRST_S
                for entry in reply.get(inbox.encode(), ()) if reply else ():
                    last = text(entry.identifier)
                    nursery.start_soon(self._answer, handler, entry.field_values[b"s"])

    async def _answer(self, handler: Handler, raw: str | bytes) -> None:
        message = json.loads(raw)
        try:
            result = await handler(message["kind"], message["args"])
        except Exception as exc:
            log.exception("signal %s failed", message["kind"])
            result = {"error": type(exc).__name__}
        try:
            with self.redis.guard("answer"):
                async with self.redis.client.pipeline(transaction=False) as pipe:
                    pipe.rpush(message["reply"], [json.dumps(result)])
                    pipe.pexpire(message["reply"], REPLY_TTL_MS)
        except ClusterUnavailable as exc:
            log.warning("signal %s: could not answer: %s", message["kind"], exc)
