"""Which node runs which live stream: the cluster-wide registry and the live list.

Per stream, a hash ``stream:<id>:meta`` (chat session, user, model, dialect,
reservation, assistant message, start time, the owning incarnation, its
state, and — kept current by the :class:`~server.cluster.mirror.Publisher`
— ``last`` event id and ``tokens`` produced). The owning incarnation's set
``node:<incarnation>:streams`` lists its live streams, so a survivor finds a
dead node's streams (:mod:`server.cluster.nodes`); ``streams:live`` indexes
them for ``GET /api/chat/streams/active``; ``session:<id>:latest`` names a
chat session's newest stream (for observers on other nodes), kept for
``CHINWAG_STREAM_BUFFER_MS`` after the end; ``stream:<id>:observers`` holds
each node's observer count.

Ownership is decided in Redis, once: the owner's :meth:`Registry.finishing`
and a survivor's take-over are scripts on the same state field, so exactly
one of them wins. A stream whose owner lost it (``recovering`` or
``recovered``) answers False, and the owner must then leave the database
alone: the survivor settles it.

State: ``live`` → ``finishing`` → ``ended``, or ``live``/``finishing`` →
``recovering`` → ``recovered``. Every call raises ``ClusterUnavailable``
when Redis cannot be reached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .redis import ClusterRedis

if TYPE_CHECKING:
    from .nodes import Identity

__all__ = ["ActiveStream", "NodeLost", "Registry", "StreamInfo"]


class NodeLost(Exception):
    """This node's incarnation was taken over by a survivor: it may not start streams."""


# KEYS: meta, my streams, live index, latest, tombstone. ARGV: id, latest ttl, then field pairs.
_REGISTER = """
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[1])
return 1
"""
# KEYS: meta. ARGV: my incarnation.  -> 1 the owner may end it, 0 a survivor has it
_FINISHING = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'recovering' or state == 'recovered' then return 0 end
local owner = redis.call('HGET', KEYS[1], 'incarnation')
if owner and owner ~= ARGV[1] then return 0 end
if state then redis.call('HSET', KEYS[1], 'state', 'finishing') end
return 1
"""
# KEYS: meta, my streams, live index, latest, observers. ARGV: id, buffer ms.
_FINISHED = """
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'ended')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[5], ARGV[2])
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What the cluster knows about one stream from its start."""

    stream_id: str
    session_id: str
    user_id: str
    model_id: str
    reservation_id: str
    message_id: str
    #: The dialect's name (``chat`` or ``v1``): how a mirror spells ``connected``.
    dialect: str
    #: Epoch seconds.
    started_at: float
    #: The human node id (CHINWAG_NODE_ID) that runs it.
    node_id: str
    #: The input tokens reserved for (what recovery charges with the produced ones).
    input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ActiveStream:
    """One row of ``GET /api/chat/streams/active``, cluster-wide."""

    info: StreamInfo
    observers: int


_FIELDS = {
    "stream_id": "stream",
    "session_id": "session",
    "user_id": "user",
    "model_id": "model",
    "reservation_id": "reservation",
    "message_id": "message",
    "dialect": "dialect",
    "started_at": "started_at",
    "node_id": "node",
    "input_tokens": "input",
}


def info_from_meta(meta: dict[bytes, bytes]) -> StreamInfo | None:
    values = {name: meta.get(field.encode()) for name, field in _FIELDS.items()}
    values.setdefault("input_tokens", b"0")
    if values["input_tokens"] is None:
        values["input_tokens"] = b"0"
    if any(value is None for value in values.values()):
        return None
    text = {name: value.decode() for name, value in values.items() if value is not None}
    return StreamInfo(
        **{  # type: ignore[arg-type]
            **text,
            "started_at": float(text["started_at"]),
            "input_tokens": int(text["input_tokens"]),
        }
    )


class Registry:
    """This node's live streams in Redis, and everyone's (see the module docstring)."""

    def __init__(self, redis: ClusterRedis, identity: Identity, *, buffer_ms: int) -> None:
        self.redis = redis
        self.identity = identity
        self.buffer_ms = max(1, buffer_ms)
        self._register = redis.script(_REGISTER)
        self._finishing = redis.script(_FINISHING)
        self._finished = redis.script(_FINISHED)
        self._mine: dict[str, StreamInfo] = {}  # registered and not finished
        self._registering: set[str] = set()  # being registered (see is_mine)

    def _stream_keys(self, stream_id: str, session_id: str) -> list[str]:
        keys = self.redis.keys
        inc = self.identity.incarnation
        return [
            keys("stream", stream_id, "meta"),
            keys("node", inc, "streams"),
            keys("streams", "live"),
            keys("session", session_id, "latest"),
        ]

    def mine(self) -> list[StreamInfo]:
        return list(self._mine.values())

    def is_mine(self, stream_id: str) -> bool:
        """Registered (or being registered) by this incarnation, and not finished."""
        return stream_id in self._mine or stream_id in self._registering

    async def register(self, info: StreamInfo) -> None:
        """Record a starting stream as this incarnation's (one round trip).

        Raises :class:`NodeLost` if a survivor has taken this incarnation over.
        """
        fields: list[str] = ["incarnation", self.identity.incarnation, "state", "live"]
        for name, field in _FIELDS.items():
            fields += [field, str(asdict(info)[name])]
        keys = [
            *self._stream_keys(info.stream_id, info.session_id),
            self.redis.keys("node", self.identity.incarnation, "taken"),
        ]
        # Mine from the moment the script may run (is_mine): its reply is a round
        # trip later, and an observer here may read the session's latest meanwhile.
        self._registering.add(info.stream_id)
        try:
            with self.redis.guard("register"):
                ok = await self._register(keys, [info.stream_id, self.buffer_ms, *fields])
        finally:
            self._registering.discard(info.stream_id)
        if not ok:
            raise NodeLost(self.identity.incarnation)
        self._mine[info.stream_id] = info

    async def reregister_all(self) -> None:
        """After Redis lost this node's lease (a restart, say): record every live stream again."""
        for info in list(self._mine.values()):
            await self.register(info)

    def forget_all(self) -> list[StreamInfo]:
        """The node was taken over: its streams are a survivor's now."""
        lost, self._mine = list(self._mine.values()), {}
        return lost

    async def finishing(self, stream_id: str) -> bool:
        """May this node end (persist, settle) the stream? False: a survivor has it.

        Also True when Redis no longer knows the stream at all (it lost its
        data): nobody else can have taken it then.
        """
        with self.redis.guard("finishing"):
            ok = await self._finishing(
                [self.redis.keys("stream", stream_id, "meta")], [self.identity.incarnation]
            )
        return bool(ok)

    async def finished(self, stream_id: str) -> None:
        """The stream is settled: off the live lists; its traces expire after the buffer."""
        info = self._mine.pop(stream_id, None)
        session = info.session_id if info else ""
        keys = [
            *self._stream_keys(stream_id, session),
            self.redis.keys("stream", stream_id, "observers"),
        ]
        with self.redis.guard("finished"):
            await self._finished(keys, [stream_id, self.buffer_ms])

    async def get(self, stream_id: str) -> tuple[StreamInfo, dict[bytes, bytes]] | None:
        """The stream's info and raw meta (state, incarnation, last, tokens), or None."""
        with self.redis.guard("get"):
            meta = await self.redis.client.hgetall(self.redis.keys("stream", stream_id, "meta"))
        info = info_from_meta(dict(meta)) if meta else None
        return (info, dict(meta)) if info else None

    async def latest(self, session_id: str) -> str | None:
        """The chat session's newest stream id (live, or ended within the buffer)."""
        with self.redis.guard("latest"):
            value = await self.redis.client.get(self.redis.keys("session", session_id, "latest"))
        return value.decode() if value is not None else None

    async def set_observers(self, stream_id: str, count: int) -> None:
        """This node's observer count for a stream (0 removes the node's entry)."""
        key = self.redis.keys("stream", stream_id, "observers")
        with self.redis.guard("observers"):
            if count > 0:
                await self.redis.client.hset(key, {self.identity.node_id: count})
            else:
                await self.redis.client.hdel(key, [self.identity.node_id])

    async def observers_elsewhere(self, stream_id: str) -> int:
        """A stream's observers on the other nodes (as they last told, within a second)."""
        key = self.redis.keys("stream", stream_id, "observers")
        with self.redis.guard("observers"):
            counts = await self.redis.client.hgetall(key)
        mine = self.identity.node_id.encode()
        return sum(int(v) for k, v in counts.items() if k != mine)

    async def active(self) -> list[ActiveStream]:
        """Every live stream of the cluster, oldest first, with observers summed over nodes."""
        keys = self.redis.keys
        client = self.redis.client
        with self.redis.guard("active"):
            ids = sorted(m.decode() for m in await client.smembers(keys("streams", "live")))
            if not ids:
                return []
            async with client.pipeline(transaction=False) as pipe:
                metas = [pipe.hgetall(keys("stream", sid, "meta")) for sid in ids]
                counts = [pipe.hvals(keys("stream", sid, "observers")) for sid in ids]
            rows = [(await m, await c) for m, c in zip(metas, counts, strict=True)]
        out = []
        for meta, observers in rows:
            info = info_from_meta(dict(meta)) if meta else None
            if info is None or meta.get(b"state") not in (b"live", b"finishing"):
                continue
            out.append(ActiveStream(info, sum(int(v) for v in observers)))
        out.sort(key=lambda row: row.info.started_at)
        return out
