"""The Redis connection of cluster mode: one coredis client on Trio, a key prefix, one error.

:func:`open_redis` opens a ``coredis.Redis`` (coredis 6 runs on Trio natively,
through anyio) from ``CHINWAG_REDIS_URL`` and checks it answers, or raises
:class:`ClusterUnavailable` naming the URL with its password masked. Every
call the cluster modules make goes through :meth:`ClusterRedis.guard`, which
turns whatever the client or the network raises (connection refused or
reset, a timeout, ``LOADING`` after a restart…) into that one error, which
the server maps to 503 ``SERVICE_UNAVAILABLE`` with ``Retry-After``.

Keys. Every key of a deployment starts with one prefix: ``chinwag:`` by
default, ``chinwag:<name>:`` with ``?prefix=<name>`` on the URL (the query
parameter is chinwag's, removed before coredis sees the URL), or whatever
:func:`open_redis` is given (the tests use one per test and delete only
their own keys with :meth:`ClusterRedis.delete_prefix`; nothing here ever
runs ``FLUSHDB``). Scripts touch keys they compute from the prefix, so this
needs a standalone Redis (or Sentinel), not Redis Cluster.

Measured here (loopback Redis 7.0, coredis 6.9, trio 0.35, the 2-core
machine shared with other work; ``python -m server.cluster.bench``): one
``XADD … MAXLEN ~ 4096`` per round trip 320 to 390 µs p50 (~550 µs p99);
pipelined, ~15k XADD/s in batches of 10 and ~21k/s in batches of 100
(client CPU-bound, ~47 µs each); a blocked ``XREAD`` wakes ~1 ms after an
``XADD`` from another connection. So the
:class:`~server.cluster.publisher.Publisher` sends one pipeline per wake-up
for every stream, never a round trip per token, and a mirror costs a node
one blocked read per stream, not one per reader.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
import trio

from ledger import mask_url

__all__ = ["DEFAULT_PREFIX", "ClusterRedis", "ClusterUnavailable", "Keys", "open_redis", "text"]

log = logging.getLogger("chinwag.cluster")

DEFAULT_PREFIX = "chinwag:"
#: How long one call may take before Redis counts as unavailable.
OP_TIMEOUT_S = 5.0
#: Blocking readers (mirrors, signal inboxes) each hold a connection while they wait.
MAX_CONNECTIONS = 1024

#: What a broken or missing Redis raises, whichever layer notices first.
_TROUBLE = (
    coredis.exceptions.RedisError,
    OSError,
    TimeoutError,
    trio.TooSlowError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


class _LostConnectionNotice(logging.Filter):
    """coredis logs a lost or cancelled connection as an error with a traceback
    (an empty one, or a ``Cancelled`` when one of our timeouts ended its
    connection attempt). For chinwag that is Redis trouble like any other,
    reported by the part that notices it: keep coredis's line as a warning,
    with the exception's one-line summary instead of the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return True
        exc = record.exc_info[1]
        if exc is not None:
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_lost_connections() -> None:
    """Install :class:`_LostConnectionNotice` on coredis's logger once."""
    logger = logging.getLogger("coredis")
    if not any(isinstance(f, _LostConnectionNotice) for f in logger.filters):
        logger.addFilter(_LostConnectionNotice())


class ClusterUnavailable(Exception):
    """Redis cannot be used right now: refuse the new work, retry later.

    ``retry_after`` is the number of seconds a client should wait (the
    ``Retry-After`` of the 503). The message never holds a password.
    """

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Keys:
    """The deployment's key names: ``keys("stream", sid)`` is ``<prefix>stream:<sid>``."""

    prefix: str

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)


def split_url(url: str) -> tuple[str, str]:
    """``(url without chinwag's own ?prefix=, the key prefix)``."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    name = next((value for key, value in pairs if key == "prefix"), "")
    rest = urlencode([(key, value) for key, value in pairs if key != "prefix"])
    prefix = f"{DEFAULT_PREFIX}{name}:" if name else DEFAULT_PREFIX
    return urlunsplit(parts._replace(query=rest)), prefix


class ClusterRedis:
    """The open client, the deployment's :class:`Keys`, and the error boundary.

    ``client`` is a ``coredis.Redis[bytes]`` (replies are bytes). Use it only
    inside :meth:`guard`. Safe to share between tasks: coredis multiplexes
    plain commands over its pool; a blocking command holds a connection of
    its own while it waits, and cancelling it drops that connection, which
    leaves the client usable.
    """

    def __init__(self, client: coredis.Redis[bytes], keys: Keys, where: str, url: str = "") -> None:
        self.client = client
        self.keys = keys
        #: The URL with its password masked: the only form ever logged.
        self.where = where
        #: The URL itself (password and all), for a connection of the lease keeper's own.
        self.url = url

    @contextmanager
    def guard(self, what: str, timeout: float | None = OP_TIMEOUT_S) -> Iterator[None]:
        """Run Redis calls: any failure leaves as :class:`ClusterUnavailable`.

        ``timeout`` bounds the whole block (None: unbounded, for blocking
        reads that carry their own bound). Cancellation passes through
        unchanged.
        """
        try:
            if timeout is None:
                yield
            else:
                with trio.fail_after(timeout):
                    yield
        except _TROUBLE as exc:
            raise ClusterUnavailable(
                f"Redis at {self.where} is unavailable ({what}): {_describe(exc)}"
            ) from exc

    def script(self, source: str) -> Any:
        """A Lua script, loaded on first use and again after a Redis restart."""
        return self.client.register_script(source)

    async def ping(self) -> None:
        """Raises :class:`ClusterUnavailable` unless Redis answers now."""
        with self.guard("ping"):
            await self.client.ping()

    async def delete_prefix(self, prefix: str | None = None) -> int:
        """Delete every key under ``prefix`` (default: this deployment's) with SCAN + DEL.

        For tests and tear-downs; never touches another prefix's keys.
        """
        match = (prefix or self.keys.prefix) + "*"
        deleted = 0
        with self.guard("delete_prefix", timeout=60):
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=match, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await self.client.delete(batch)
                    batch = []
            if batch:
                deleted += await self.client.delete(batch)
        return deleted


def text(value: str | bytes) -> str:
    """A reply's bytes as text (coredis types stream ids and fields as ``str | bytes``)."""
    return value.decode() if isinstance(value, bytes) else value


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    prefix: str | None = None,
    connect_timeout: float = 2.0,
    max_connections: int = MAX_CONNECTIONS,
) -> AsyncIterator[ClusterRedis]:
    """Open the client, check that Redis answers, yield it; close it on exit.

    Raises :class:`ClusterUnavailable` (the URL masked) when Redis does not
    answer within ``connect_timeout``. ``prefix`` overrides the URL's.
    Must be entered in a Trio task; the client's own tasks live inside.
    """
    quiet_lost_connections()
    target, url_prefix = split_url(url)
    where = mask_url(url)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        target,
        decode_responses=False,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
    )
    redis = ClusterRedis(client, Keys(prefix or url_prefix), where, target)
    try:
        async with client:
            with redis.guard("connect", timeout=connect_timeout + 1):
                await client.ping()
            yield redis
    except BaseExceptionGroup as group:
        # The client's task group wraps whatever left its body (ours included):
        # a single error comes out as itself, Redis trouble as ClusterUnavailable.
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        leaf = leaves[0]
        if isinstance(leaf, _TROUBLE):
            raise ClusterUnavailable(
                f"Redis at {where} is unavailable: {_describe(leaf)}"
            ) from leaf
        raise leaf from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
