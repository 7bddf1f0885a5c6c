"""Hypercorn configuration for chinwag: one home for `chinwag serve` and the tests.

Slow readers: a client that keeps its connection open but stops reading
would pin its connection task forever (Hypercorn shields its writes and has
no write timeout). Two defences:

- while serving, the kernel's ``TCP_USER_TIMEOUT`` on the listening socket,
  inherited by every accepted socket: when data written to a client stays
  unacknowledged (a zero receive window included) for
  ``CHINWAG_SLOW_CLIENT_TIMEOUT_MS``, the kernel aborts the connection, the
  blocked write fails, and the stream ends as a disconnect. The stream's own
  producer has the same bound (see :mod:`server.streams`);
- at shutdown, once the streams are settled and the connections had their
  drain time, :func:`cut_connections` aborts every connection still open:
  a write blocked on a client that stopped reading is never reached by
  Hypercorn's cancellation (the write is shielded), but shutting the socket
  down wakes it with an error.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import stat
import struct
from collections.abc import Collection, Iterator, Mapping
from contextlib import closing
from typing import Any

from hypercorn.config import Config, Sockets

from .settings import Settings

#: Where the process's open file descriptors are listed (Linux; BSD and macOS).
_FD_DIRS = ("/proc/self/fd", "/dev/fd")


class ChinwagConfig(Config):
    user_timeout_ms: int = 30_000
    #: The ports of the listening sockets, once :meth:`create_sockets` has bound them.
    bound_ports: frozenset[int] = frozenset()

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        listening = sockets.insecure_sockets + sockets.secure_sockets
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            for sock in listening:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.user_timeout_ms)
        self.bound_ports = frozenset(
            sock.getsockname()[1]
            for sock in listening
            if sock.family in (socket.AF_INET, socket.AF_INET6)
        )
        return sockets


#: The cyclic GC's thresholds in a serving process (CPython's are 700, 10, 10).
GC_THRESHOLDS = (10_000, 5, 40)

#: The timer service's waiters rescheduled per pass of trio's loop, at most
#: (``server.timers.Timers(per_pass=)``; the floors in scripts/bench_floor.py
#: run with it too). ~50-100 µs of work each: a loop that cannot keep up
#: serves its streams in turn, a few ms a pass, and a new connection's every
#: step waits for one such pass, not for one event of every live stream.
TIMER_PER_PASS = 64


def tune_gc() -> None:
    """How often the cyclic garbage collector runs in ``chinwag serve``.

    Every event allocates a few short-lived objects (the event, its batch,
    the ASGI message). At CPython's default a young collection ran every 700
    allocations, promoting whatever was merely in flight at that moment; the
    older generations grew and were collected again and again — at 250
    streams x 20/s, 2.1 s of every 18 s, in pauses of up to ~115 ms (full
    collections), which were the streams' lateness p99. At 10,000 the
    in-flight objects are mostly gone by the next collection: 0.2 s in 18 s,
    no full collection, lateness p99 118-181 ms -> 3-5 ms (BENCHMARKS.md).
    Garbage in a cycle waits a little longer to be freed; nothing else changes.

    The middle generation is collected every 5 young collections (not 20):
    what hundreds of streams opening at once leave behind (~240 tracked
    objects a stream: Hypercorn's, Quart's, trio's and ours) then moves to
    the old generation in several small pauses instead of one — at 500
    streams opening, one 78-98 ms pause became a few of at most ~25 ms. The
    old generation's (full) collection stays as rare as before (every 200
    young ones: 5 x 40).
    """
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_heap() -> None:
    """Once started: what exists now (modules, the app, the providers' clients)
    lives as long as the process, so later full collections need not scan it
    again (``gc.freeze``)."""
    gc.collect()
    gc.freeze()


def hypercorn_config(
    settings: Settings, host: str | None = None, port: int | None = None
) -> ChinwagConfig:
    host = host or settings.host
    port = settings.port if port is None else port
    config = ChinwagConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # chinwag logs requests itself, as JSON with request ids
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = settings.shutdown_grace_ms / 1000
    config.include_server_header = False
    config.user_timeout_ms = settings.slow_client_timeout_ms
    return config


def cut_connections(ports: Collection[int]) -> int:
    """Abort every connection this process accepted on ``ports``; return how many.

    For the very end of a shutdown. Each accepted TCP socket whose local port
    is one of ``ports`` is set to linger 0 and shut down both ways: a task
    blocked writing to it (or reading from it) wakes at once with an error,
    and when its owner closes it the kernel sends a reset and drops the
    unsent data, instead of keeping an orphan that retries for minutes.
    Listening sockets and this process's own outgoing connections are left
    alone. Synchronous and never blocks; the sockets stay open (their owner,
    Hypercorn, closes them). Where the process's descriptors cannot be listed
    it cuts nothing (the kernel's ``TCP_USER_TIMEOUT`` is then the bound).
    """
    if not ports:
        return 0
    cut = 0
    for fd in _open_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with closing(_duplicate(fd)) as sock:
                if _accepted_on(sock, ports):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RDWR)
                    cut += 1
        except OSError:
            continue  # closed meanwhile, or not a socket we can use: not ours to cut
    return cut


def cut_peer(scope: Mapping[str, Any]) -> bool:
    """Abort the one connection an ASGI ``scope`` came in on (as :func:`cut_connections`).

    Found by its two ends (``scope["client"]``, ``scope["server"]``'s port)
    among the process's descriptors: a scan, for the rare stream whose run
    must stop while it is stuck writing to a client that does not read
    (:mod:`server.push`). False if it was not found (already gone, or no
    descriptor list on this system).
    """
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return False
    peer, port = (client[0], int(client[1])), int(server[1])
    for fd in _open_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with closing(_duplicate(fd)) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if sock.getsockname()[1] != port or tuple(sock.getpeername()[:2]) != peer:
                    continue
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
                return True
        except OSError:
            continue
    return False


def _open_fds() -> Iterator[int]:
    for fd_dir in _FD_DIRS:
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        yield from (int(name) for name in names if name.isdigit())
        return


def _duplicate(fd: int) -> socket.socket:
    """A socket object on a duplicate of ``fd``.

    Closing it never closes the owner's descriptor, while options and
    ``shutdown`` act on the socket both descriptors share.
    """
    dup = os.dup(fd)
    try:
        return socket.socket(fileno=dup)
    except BaseException:
        os.close(dup)
        raise


def _accepted_on(sock: socket.socket, ports: Collection[int]) -> bool:
    """A connected TCP socket whose local port is a listening port: a client's connection."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    if sock.getsockname()[1] not in ports:
        return False
    try:
        sock.getpeername()
    except OSError:  # the listening socket itself
        return False
    return True
