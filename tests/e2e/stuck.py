"""A client that asks for a long answer, reads the response head, then never reads again."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import trio

#: A model whose maxTokens allows the long answers these clients ask for.
LONG_MODEL = "amazon.titan-text-express-v1"


async def stuck_stream(url: str, token: str, session_id: str, max_tokens: int) -> trio.SocketStream:
    """Start a stream of ``max_tokens`` from a socket with a 4 KB receive buffer and
    return it once the response head (200) is in; the caller never reads again."""
    parts = urlsplit(url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    body = json.dumps(
        {"message": "flood me", "maxTokens": max_tokens, "modelId": LONG_MODEL}
    ).encode()
    await stream.send_all(
        f"POST /api/chat/sessions/{session_id}/stream HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert (await stream.receive_some(200)).startswith(b"HTTP/1.1 200")
    return stream
