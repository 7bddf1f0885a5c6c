"""Hypercorn configuration for chinwag: one home for `chinwag serve` and the tests.

Slow readers: a client that keeps its connection open but stops reading
would pin its connection task forever (Hypercorn shields its writes and has
no write timeout). The defence is the kernel's ``TCP_USER_TIMEOUT`` on the
listening socket, inherited by every accepted socket: when data written to
a client stays unacknowledged (a zero receive window included) for
``CHINWAG_SLOW_CLIENT_TIMEOUT_MS``, the kernel aborts the connection, the
blocked write fails, and the stream ends as a disconnect. The stream's own
producer has the same bound (see :mod:`server.streams`).
"""

from __future__ import annotations

import logging
import socket

from hypercorn.config import Config, Sockets

from .settings import Settings


class ChinwagConfig(Config):
    user_timeout_ms: int = 30_000

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            for sock in sockets.insecure_sockets + sockets.secure_sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.user_timeout_ms)
        return sockets


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
