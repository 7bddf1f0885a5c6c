"""A node's lease, kept alive from a thread of its own, on a connection of its own.

Measured (``scripts/bench_cluster.py``, 2,000 streams x 20/s on two
saturated workers): renewing the lease from the Trio loop, over the client
every other part shares, let a *live* node's lease lapse — its renewal
waited behind the publisher's pipelines and a loop busy for seconds — and
the two workers took each other over. Liveness must not depend on how busy
the loop is, only on whether it still runs. So:

- :class:`LeaseKeeper` renews ``node:<incarnation>`` every lease / 3 from a
  daemon thread, over a plain blocking socket speaking RESP (``EVAL`` of the
  node's renew script; ``AUTH``/``SELECT`` from the URL; TLS for
  ``rediss://``, a Unix socket for ``unix://``), sharing nothing with the
  coredis client;
- it renews only while the Trio loop shows progress: the loop calls
  :meth:`LeaseKeeper.beat` every :attr:`LeaseKeeper.beat_s` (:data:`BEAT_S`,
  or an eighth of a shorter lease); a loop that has not beaten for half a
  lease (hung, deadlocked) lets the lease lapse, so a survivor recovers its
  streams, as for a dead process;
- the outcome of each renewal (1 renewed, 0 re-acquired after Redis lost
  it, -1 taken over) is left in :attr:`LeaseKeeper.outcome` for the loop to
  act on (:class:`~server.cluster.nodes.Node` re-registers or steps down).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["BEAT_S", "LeaseKeeper", "RespError", "resp_command"]

log = logging.getLogger("chinwag.cluster.lease")

#: How often the Trio loop says it is alive (more often for a lease under 2 s).
BEAT_S = 0.25
#: Socket timeout for one command of the keeper.
COMMAND_TIMEOUT_S = 2.0


class RespError(Exception):
    """Redis answered with an error (``-ERR …``)."""


def _encode(args: list[bytes | str | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self.buf) < size + 2:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                self.buf += chunk
            data, self.buf = self.buf[:size], self.buf[size + 2 :]
            return data
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.reply() for _ in range(count)]
        raise ConnectionError(f"unexpected reply {line[:40]!r}")


def resp_command(sock: socket.socket, *args: bytes | str | int) -> object:
    """Send one command on a blocking socket and read its reply."""
    sock.sendall(_encode(list(args)))
    return _Reader(sock).reply()


def _connect(url: str) -> socket.socket:
    """A blocking socket to the Redis of ``url``, authenticated, on its database."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(COMMAND_TIMEOUT_S)
        sock.connect(parts.path)
        db = int(query.get("db", ["0"])[0] or 0)
    else:
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        sock = socket.create_connection((host, port), timeout=COMMAND_TIMEOUT_S)
        if parts.scheme == "rediss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        path = parts.path.strip("/")
        db = int(path) if path.isdigit() else 0
    try:
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
            resp_command(sock, "AUTH", *([user] if user else []), password)
        if db:
            resp_command(sock, "SELECT", db)
    except BaseException:
        sock.close()
        raise
    return sock


class LeaseKeeper:
    """Renews a lease from a thread while the loop beats (see the module docstring)."""

    def __init__(
        self,
        url: str,
        script: str,
        keys_for: Callable[[], tuple[list[str], list[str | int]]],
        *,
        lease_ms: int,
    ) -> None:
        self.url = url
        self.script = script
        #: The renew script's KEYS and ARGV for the current incarnation.
        self.keys_for = keys_for
        self.lease_ms = lease_ms
        #: How often the loop beats: several times per half lease, so only a loop
        #: held up for most of one reads as hung.
        self.beat_s = min(BEAT_S, lease_ms / 8000)
        #: The last renewal's answer: 1, 0 or -1; None before the first, or while failing.
        self.outcome: int | None = None
        self._alive_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def beat(self) -> None:
        """The Trio loop is alive (called every :attr:`beat_s` from a task of its own)."""
        self._alive_at = time.monotonic()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="chinwag-lease", daemon=True)
        self._thread.start()

    def stop_soon(self) -> None:
        """Stop renewing after the command in flight, if any (never blocks)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop renewing (blocks at most one command's time)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(COMMAND_TIMEOUT_S + 1)
            self._thread = None
        self._close()

    def renew_once(self) -> int:
        """One renewal on the keeper's connection (raises OSError/RespError)."""
        keys, argv = self.keys_for()
        if self._sock is None:
            self._sock = _connect(self.url)
        try:
            result = resp_command(self._sock, "EVAL", self.script, len(keys), *keys, *argv)
        except (OSError, ConnectionError):
            self._close()
            raise
        if not isinstance(result, int):
            raise RespError(f"unexpected answer {result!r}")
        return result

    def _run(self) -> None:
        period = self.lease_ms / 3000
        stale_after = self.lease_ms / 2000
        failing = False
        try:
            while not self._stop.wait(period):
                if time.monotonic() - self._alive_at > stale_after:
                    if not failing:
                        log.error(
                            "the event loop has not run for %.1f s: lease not renewed",
                            time.monotonic() - self._alive_at,
                        )
                    failing = True
                    continue
                try:
                    self.outcome = self.renew_once()
                    failing = False
                except (OSError, ConnectionError, RespError, ValueError) as exc:
                    self.outcome = None
                    if not failing:
                        log.warning("lease: could not renew: %s: %s", type(exc).__name__, exc)
                    failing = True
        finally:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
