"""Node leases, and a survivor's recovery of a dead node's streams, exactly once.

Each process is one *incarnation* of its node id (``<CHINWAG_NODE_ID>.<random>``):
a restarted process is a new incarnation, so the streams its predecessor
left behind are recovered like any dead node's. An incarnation holds the
lease ``node:<incarnation>`` (``PX CHINWAG_NODE_LEASE_MS``) and renews it
every lease / 3 (:meth:`Node.run`); it is listed in ``nodes``.

Recovery (SPEC §9). A survivor that finds a listed incarnation without a
lease takes it over with one script (:data:`_TAKE_OVER`): only if the lease
is still absent and the incarnation still listed, it unlists it, leaves a
tombstone ``node:<dead>:taken``, marks each of its streams ``recovering``
(the owner's ``finishing`` then answers False), frees their session claims
and cap places, and moves them into the survivor's own ``recovering`` set.
Several survivors may try at once: the script runs once per incarnation, so
exactly one gets the streams. If that survivor dies before it has settled
them, its own incarnation is taken over with them, so nothing is orphaned.
:meth:`Node.recover` then hands each stream (:class:`RecoveredStream`: ids,
tokens the cluster saw produced, last event id) to the server's ``settle``
callback (message ``interrupted``, reservation settled or released — it must
be idempotent on the database: a stream whose owner died mid-ending may
already be settled, and the ledger refuses a second settlement), appends the
closing events it returns to the stream's Redis Stream after the last id,
then an end marker that fences off any later write by the old owner.

A node that comes back after its lease expired (a long pause, a partition)
renews against the tombstone: it learns it was taken over
(:attr:`Identity.lost` is set, ``on_lost`` is called), never re-creates
what was recovered, and — to keep serving — continues as a fresh
incarnation. If its lease expired but nobody took it over yet (or Redis
lost its data in a restart), it simply takes its lease back and registers
its live streams again.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .lease import LeaseKeeper
from .publisher import END_ID, entry_id
from .redis import ClusterRedis, ClusterUnavailable, text
from .registry import Registry, info_from_meta

__all__ = ["Identity", "Node", "RecoveredStream"]

log = logging.getLogger("chinwag.cluster.nodes")

#: How long a tombstone says "taken over" (a node paused longer than this is gone anyway).
TOMBSTONE_MS = 7 * 24 * 3600 * 1000

# KEYS: lease, tombstone, nodes. ARGV: lease ms, incarnation.
# -> 1 renewed, 0 re-acquired (lease had expired, nobody took over), -1 taken over
_RENEW = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 then return 1 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return 0
"""
# KEYS: dead lease, dead streams, dead recovering, my recovering, nodes, dead tombstone.
# ARGV: dead incarnation, my incarnation, key prefix, tombstone ms.
_TAKE_OVER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('SREM', KEYS[5], ARGV[1]) == 0 then return false end
redis.call('SET', KEYS[6], ARGV[2], 'PX', ARGV[4])
local ids = redis.call('SUNION', KEYS[2], KEYS[3])
redis.call('DEL', KEYS[2], KEYS[3])
for _, id in ipairs(ids) do
  local meta = ARGV[3] .. 'stream:' .. id .. ':meta'
  local session = redis.call('HGET', meta, 'session')
  local user = redis.call('HGET', meta, 'user')
  local owner = redis.call('HGET', meta, 'incarnation')
  if session then
    local claim = ARGV[3] .. 'session:' .. session .. ':claim'
    if redis.call('GET', claim) == owner .. '|' .. id then redis.call('DEL', claim) end
  end
  if user then redis.call('ZREM', ARGV[3] .. 'user:' .. user .. ':streams', id) end
  if redis.call('EXISTS', meta) == 1 then
    redis.call('HSET', meta, 'state', 'recovering', 'incarnation', ARGV[2])
  end
  redis.call('SADD', KEYS[4], id)
end
return ids
"""
# KEYS: lease, my streams, my recovering, nodes. ARGV: incarnation.  A clean exit.
_LEAVE = """
if redis.call('SCARD', KEYS[2]) + redis.call('SCARD', KEYS[3]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""


class Identity:
    """This process in the cluster: its node id and its current incarnation."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.incarnation = ""
        self.renew()
        #: Set when a survivor took over an incarnation of this process.
        self.lost = trio.Event()

    def renew(self) -> str:
        self.incarnation = f"{self.node_id}.{secrets.token_hex(4)}"
        return self.incarnation


@dataclass(frozen=True, slots=True)
class RecoveredStream:
    """A dead node's stream, handed to the ``settle`` callback once."""

    stream_id: str
    session_id: str
    user_id: str
    model_id: str
    reservation_id: str
    message_id: str
    dialect: str
    started_at: float
    #: The node id (CHINWAG_NODE_ID) that ran it.
    node_id: str
    #: Tokens the cluster saw produced (what the owner's Publisher reported).
    tokens: int
    #: The last event id in the cluster's copy; closing events follow it.
    last_id: int
    #: The owner had already published its end: only the database may be left to tidy.
    ended: bool
    #: The input tokens it reserved for.
    input_tokens: int = 0


#: ``settle(stream)`` -> the closing events ``(name, data)`` to publish after ``last_id``.
Settle = Callable[[RecoveredStream], Awaitable[Sequence[tuple[str, str]]]]


class Node:
    """This process's lease, its renewal, and recovery (see the module docstring)."""

    def __init__(
        self,
        redis: ClusterRedis,
        identity: Identity,
        registry: Registry,
        *,
        lease_ms: int,
        buffer_ms: int,
    ) -> None:
        self.redis = redis
        self.identity = identity
        self.registry = registry
        self.lease_ms = lease_ms
        self.buffer_ms = max(1, buffer_ms)
        self._renew = redis.script(_RENEW)
        self._take_over = redis.script(_TAKE_OVER)
        self._leave = redis.script(_LEAVE)
        #: Renews the lease from a thread while the loop runs (server.cluster.lease).
        self.keeper = LeaseKeeper(redis.url, _RENEW, self._renew_args, lease_ms=lease_ms)

    def _renew_args(self) -> tuple[list[str], list[str | int]]:
        inc = self.identity.incarnation
        keys = [self._key(inc), self._key(inc, "taken"), self.redis.keys("nodes")]
        return keys, [self.lease_ms, inc]

    def _key(self, incarnation: str, *rest: str) -> str:
        return self.redis.keys("node", incarnation, *rest)

    async def join(self) -> None:
        """Take this incarnation's lease and list it (raises ``ClusterUnavailable``)."""
        if await self.renew() == -1:  # pragma: no cover - a fresh random incarnation
            raise RuntimeError("a new incarnation was already taken over")

    async def renew(self) -> int:
        """1 renewed, 0 lease taken back (streams registered again), -1 taken over."""
        inc = self.identity.incarnation
        keys = [self._key(inc), self._key(inc, "taken"), self.redis.keys("nodes")]
        with self.redis.guard("lease"):
            result = int(await self._renew(keys, [self.lease_ms, inc]))
        if result == 0:
            await self.registry.reregister_all()
        return result

    async def leave(self) -> bool:
        """Give the lease back at a clean exit; False (let it expire) if streams are left."""
        # The keeper first: a renewal after the lease is gone would take it back.
        await trio.to_thread.run_sync(self.keeper.stop)
        inc = self.identity.incarnation
        keys = [
            self._key(inc),
            self._key(inc, "streams"),
            self._key(inc, "recovering"),
            self.redis.keys("nodes"),
        ]
        with self.redis.guard("leave"):
            return bool(await self._leave(keys, [inc]))

    async def dead(self) -> list[str]:
        """Listed incarnations whose lease is gone (candidates for take-over)."""
        client = self.redis.client
        with self.redis.guard("dead"):
            listed = [m.decode() for m in await client.smembers(self.redis.keys("nodes"))]
            others = [inc for inc in listed if inc != self.identity.incarnation]
            if not others:
                return []
            async with client.pipeline(transaction=False) as pipe:
                alive = [pipe.exists([self._key(inc)]) for inc in others]
            return [inc for inc, exists in zip(others, alive, strict=True) if not await exists]

    async def take_over(self, dead: str) -> list[str] | None:
        """Atomically take a dead incarnation's streams; None if it was not ours to take."""
        mine = self.identity.incarnation
        keys = [
            self._key(dead),
            self._key(dead, "streams"),
            self._key(dead, "recovering"),
            self._key(mine, "recovering"),
            self.redis.keys("nodes"),
            self._key(dead, "taken"),
        ]
        args = [dead, mine, self.redis.keys.prefix, TOMBSTONE_MS]
        with self.redis.guard("take over"):
            ids = await self._take_over(keys, args)
        if ids is None:
            return None
        log.warning("took over node %s: %d streams to recover", dead, len(ids))
        return [i.decode() for i in ids]

    async def pending(self) -> list[RecoveredStream]:
        """The streams in this incarnation's ``recovering`` set, with what the cluster saw."""
        client, keys = self.redis.client, self.redis.keys
        with self.redis.guard("pending"):
            ids = sorted(
                m.decode()
                for m in await client.smembers(self._key(self.identity.incarnation, "recovering"))
            )
            if not ids:
                return []
            async with client.pipeline(transaction=False) as pipe:
                metas = [pipe.hgetall(keys("stream", sid, "meta")) for sid in ids]
                tops = [pipe.xrevrange(keys("stream", sid), count=1) for sid in ids]
            rows = [
                (sid, dict(await m), await t) for sid, m, t in zip(ids, metas, tops, strict=True)
            ]
        out = []
        for sid, meta, top in rows:
            info = info_from_meta(meta)
            if info is None:
                log.error("stream %s: nothing is known of it any more; cannot recover", sid)
                await self._forget(sid)
                continue
            # The newest entry (never trimmed) says how far the stream got.
            last, tokens, ended = 0, 0, False
            if top:
                ident, fields = text(top[0].identifier), top[0].field_values
                tokens = int(fields.get(b"t", b"0"))
                ended = ident == END_ID
                last = int(fields[b"end"]) if ended else int(ident.split("-")[1])
            out.append(
                RecoveredStream(**_info_dict(info), tokens=tokens, last_id=last, ended=ended)
            )
        return out

    async def close(self, stream: RecoveredStream, closing: Sequence[tuple[str, str]]) -> None:
        """Publish the closing events and the end marker; the stream is recovered."""
        client, keys = self.redis.client, self.redis.keys
        key = keys("stream", stream.stream_id)
        with self.redis.guard("close recovered"):
            async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
                last = stream.last_id
                if not stream.ended:
                    for name, data in closing:
                        last += 1
                        pipe.xadd(key, {"n": name, "d": data}, identifier=entry_id(last))
                    pipe.xadd(key, {"end": str(last), "k": str(len(closing))}, identifier=END_ID)
                pipe.pexpire(key, self.buffer_ms)
                meta = keys("stream", stream.stream_id, "meta")
                pipe.hset(meta, {"state": "recovered", "last": str(last)})
                pipe.pexpire(meta, self.buffer_ms)
                pipe.srem(keys("streams", "live"), [stream.stream_id])
                pipe.pexpire(keys("session", stream.session_id, "latest"), self.buffer_ms)
            # Errors in the pipeline (an XADD already applied by an earlier try) are fine.
        await self._forget(stream.stream_id)

    async def _forget(self, stream_id: str) -> None:
        with self.redis.guard("forget"):
            await self.redis.client.srem(
                self._key(self.identity.incarnation, "recovering"), [stream_id]
            )

    async def recover(self, settle: Settle) -> int:
        """Take over every dead incarnation, settle and close each of its streams.

        Returns how many streams were closed. A stream whose ``settle``
        raised stays in this incarnation's ``recovering`` set for the next
        call. Raises ``ClusterUnavailable`` when Redis cannot be reached.
        """
        for dead in await self.dead():
            await self.take_over(dead)
        closed = 0
        for stream in await self.pending():
            try:
                closing = await settle(stream)
            except Exception:
                log.exception(
                    "stream %s: recovery's settlement failed; will retry", stream.stream_id
                )
                continue
            await self.close(stream, closing)
            closed += 1
        return closed

    async def run(
        self,
        settle: Settle,
        on_lost: Callable[[list[Any]], Any] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Join, then keep the lease and, every lease / 3, recover dead nodes' streams.

        Reports started once the lease is held (so raises ``ClusterUnavailable``
        before that if Redis is down). The lease is renewed by the
        :class:`~server.cluster.lease.LeaseKeeper`'s thread while this loop
        beats; this task acts on what the keeper saw: a lease re-acquired
        (Redis lost it) re-registers the live streams; a take-over calls
        ``on_lost(streams)`` with the :class:`~server.cluster.registry.StreamInfo`
        of the streams lost and goes on as a fresh incarnation. Redis trouble
        is logged and retried each tick. Runs until cancelled.
        """
        await self.join()
        self.keeper.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._beat)
                task_status.started()
                while True:
                    await trio.sleep(self.lease_ms / 3000)
                    try:
                        await self._tick(settle, on_lost)
                    except ClusterUnavailable as exc:  # the next tick tries again
                        log.warning("node %s: %s", self.identity.incarnation, exc)
                    except Exception:  # a bug: logged; the keeper still renews
                        log.exception("node %s: recovery failed", self.identity.incarnation)
        finally:
            self.keeper.stop_soon()

    async def _beat(self) -> None:
        """Tell the keeper this loop still runs."""
        while True:
            self.keeper.beat()
            await trio.sleep(self.keeper.beat_s)

    async def _tick(self, settle: Settle, on_lost: Callable[[list[Any]], Any] | None) -> None:
        outcome, self.keeper.outcome = self.keeper.outcome, None
        if outcome == -1:
            lost = self.registry.forget_all()
            log.error(
                "node %s was taken over by a survivor: %d streams lost",
                self.identity.incarnation,
                len(lost),
            )
            self.identity.lost.set()
            if on_lost is not None:
                on_lost(lost)
            self.identity.renew()
            await self.join()
        elif outcome == 0:  # the keeper took the lease back: Redis had lost it
            await self.registry.reregister_all()
        await self.recover(settle)


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "stream_id": info.stream_id,
        "session_id": info.session_id,
        "user_id": info.user_id,
        "model_id": info.model_id,
        "reservation_id": info.reservation_id,
        "message_id": info.message_id,
        "dialect": info.dialect,
        "started_at": info.started_at,
        "node_id": info.node_id,
        "input_tokens": info.input_tokens,
    }
