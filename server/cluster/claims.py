"""Cluster-wide admission: one stream per chat session, the per-user cap, the rate limits.

Each decision is one Lua script, so it is atomic in Redis (no
read-then-write between nodes):

- :meth:`Claims.admit` — the chat session's claim (``SET claim owner NX PX
  lease``, the owner being ``<incarnation>|<stream id>``) and the user's
  cap (a sorted set of the user's streams scored by expiry: entries of a
  dead node age out; count + add in the same script) are taken together or
  not at all. Held claims are renewed every ``lease / 3`` by
  :meth:`Claims.run`, in one pipeline for all of them, and released by
  :meth:`Claims.release` (compare-and-delete: a claim that expired and was
  taken by another stream is never deleted by its old owner). A claim that
  lapsed while its stream ran (renewals late on a saturated loop, Redis
  away for longer than a lease) and that nobody took meanwhile is taken
  again by the next renewal, so the session stays one stream's; one that
  another stream took is lost (logged; the running stream finishes for its
  client, as streams do while Redis is away, SPEC §9).
- :class:`RateLimiter` — a token bucket per key in one script, with the
  semantics of :class:`server.limits.RateLimiter`: ``per_minute`` requests
  a minute with bursts up to ``per_minute``; :meth:`RateLimiter.take`
  answers 0.0 (go ahead) or the seconds until a token is back. Time is
  Redis's own clock (``TIME``), so nodes' clocks need not agree.

Every call raises :class:`~server.cluster.redis.ClusterUnavailable` when
Redis cannot be reached; a refused admission is :class:`SessionBusy` or
:class:`UserAtCap`. Cancellation: a script that reached Redis has run or
will run whole; a cancelled :meth:`Claims.admit` may leave a claim that is
not held locally, which then expires with its lease.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .redis import ClusterRedis, ClusterUnavailable

if TYPE_CHECKING:
    from .nodes import Identity

__all__ = ["Admission", "ClaimRefused", "Claims", "RateLimiter", "SessionBusy", "UserAtCap"]

log = logging.getLogger("chinwag.cluster.claims")

# KEYS: claim, cap. ARGV: owner, lease ms, cap, member.  -> 1 | 0 (session busy) | -1 (cap)
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
# KEYS: claim, cap. ARGV: owner, lease ms, member.
#   -> 1 still held, 2 it had lapsed and nobody took it: held again, 0 lost (another holds it)
_RENEW = """
local holder = redis.call('GET', KEYS[1])
local result = 1
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  result = 2
elseif holder ~= ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 0
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return result
"""
# KEYS: claim, cap. ARGV: owner, member.  -> 1 released, 0 it was not ours (any more)
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
# KEYS: bucket. ARGV: capacity, tokens per ms.  -> ms to wait (0: go ahead), as a string
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then tokens = cap; ts = now end
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate) + 1000)
return string.format('%.17g', wait)
"""


class ClaimRefused(Exception):
    """The cluster said no to a new stream (not an outage)."""


class SessionBusy(ClaimRefused):
    """The chat session already has a live stream somewhere in the cluster (409)."""


class UserAtCap(ClaimRefused):
    """The user holds ``CHINWAG_MAX_STREAMS_PER_USER`` streams cluster-wide (429)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """A held claim on a chat session plus its place in the user's cap."""

    session_id: str
    user_id: str
    stream_id: str
    #: The claim's value: ``<incarnation>|<stream id>``.
    owner: str


def parse_owner(value: bytes | str | None) -> tuple[str, str] | None:
    """``(incarnation, stream id)`` from a claim's value, or None."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    incarnation, _, stream_id = text.rpartition("|")
    return (incarnation, stream_id) if incarnation else None


class Claims:
    """This node's admissions: taken atomically, renewed together, released once."""

    def __init__(
        self, redis: ClusterRedis, identity: Identity, *, lease_ms: int, max_per_user: int
    ) -> None:
        self.redis = redis
        self.identity = identity
        self.lease_ms = lease_ms
        self.max_per_user = max_per_user
        self._admit = redis.script(_ADMIT)
        self._renew = redis.script(_RENEW)
        self._release = redis.script(_RELEASE)
        self._held: dict[str, Admission] = {}  # by stream id

    def _keys(self, session_id: str, user_id: str) -> list[str]:
        keys = self.redis.keys
        return [keys("session", session_id, "claim"), keys("user", user_id, "streams")]

    def held(self) -> list[Admission]:
        return list(self._held.values())

    async def admit(self, session_id: str, user_id: str, stream_id: str) -> Admission:
        """Claim the chat session and a place in the user's cap, both or neither.

        Raises :class:`SessionBusy`, :class:`UserAtCap` or ``ClusterUnavailable``.
        One round trip.
        """
        owner = f"{self.identity.incarnation}|{stream_id}"
        with self.redis.guard("admit"):
            result = await self._admit(
                self._keys(session_id, user_id),
                [owner, self.lease_ms, self.max_per_user, stream_id],
            )
        if result == 0:
            raise SessionBusy(session_id)
        if result == -1:
            raise UserAtCap(user_id)
        admission = Admission(session_id, user_id, stream_id, owner)
        self._held[stream_id] = admission
        return admission

    async def release(self, admission: Admission) -> bool:
        """Give the claim and the cap place back; False if the claim was no longer ours.

        Forgotten locally first, so a failure here leaves only a lease to expire.
        """
        self._held.pop(admission.stream_id, None)
        with self.redis.guard("release"):
            result = await self._release(
                self._keys(admission.session_id, admission.user_id),
                [admission.owner, admission.stream_id],
            )
        return bool(result)

    async def holder(self, session_id: str) -> str | None:
        """The claim's value (``<incarnation>|<stream id>``) on a chat session, if any."""
        with self.redis.guard("holder"):
            value = await self.redis.client.get(self.redis.keys("session", session_id, "claim"))
        return value.decode() if value is not None else None

    async def renew_all(self) -> list[Admission]:
        """Renew every held claim in one pipeline; return (and forget) those found lost."""
        held = list(self._held.values())
        if not held:
            return []
        with self.redis.guard("renew"):
            async with self.redis.client.pipeline(transaction=False) as pipe:
                pending = [
                    self._renew(
                        self._keys(a.session_id, a.user_id),
                        [a.owner, self.lease_ms, a.stream_id],
                        client=pipe,
                    )
                    for a in held
                ]
            results = [await request for request in pending]
        lost: list[Admission] = []
        give_back: list[Admission] = []
        for admission, result in zip(held, results, strict=True):
            # Not held any more: released while the renewal was in flight (gone, not lost).
            still_held = self._held.get(admission.stream_id) is admission
            if not result and still_held:
                self._held.pop(admission.stream_id, None)
                lost.append(admission)
            elif result == 2 and still_held:
                log.warning(
                    "claims: the claim of stream %s had lapsed; nobody took it, taken again",
                    admission.stream_id,
                )
            elif result == 2:  # its release ran before this renewal re-took it
                give_back.append(admission)
        for admission in give_back:
            try:
                await self.release(admission)
            except ClusterUnavailable as exc:  # then it expires with its lease
                log.warning("claims: could not give back %s: %s", admission.stream_id, exc)
        return lost

    async def run(
        self,
        on_lost: Callable[[Admission], Any] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew held claims every ``lease / 3`` until cancelled.

        A claim found lost (it expired, maybe taken by another stream) is
        passed to ``on_lost``. Redis being unavailable is logged and retried
        on the next tick: claims then expire on their own, as a dead node's would.
        """
        task_status.started()
        while True:
            await trio.sleep(self.lease_ms / 3000)
            try:
                lost = await self.renew_all()
            except ClusterUnavailable as exc:  # try again next tick
                log.warning("claims: could not renew: %s", exc)
                continue
            for admission in lost:
                log.warning("claims: lost the claim of stream %s", admission.stream_id)
                if on_lost is not None:
                    on_lost(admission)


class RateLimiter:
    """``per_minute`` requests a minute per key, cluster-wide (see the module docstring)."""

    def __init__(self, redis: ClusterRedis, per_minute: int) -> None:
        self.redis = redis
        self.capacity = float(per_minute)
        self.rate_per_ms = per_minute / 60_000.0
        self._take = redis.script(_TAKE)

    async def take(self, key: str) -> float:
        """0.0 when the request may go ahead, else the seconds until a token is back."""
        with self.redis.guard("rate limit"):
            wait_ms = await self._take(
                [self.redis.keys("rate", key)], [repr(self.capacity), repr(self.rate_per_ms)]
            )
        return float(wait_ms) / 1000.0
