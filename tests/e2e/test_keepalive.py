"""A request refused before its body was read must not stall its keep-alive connection.

Found by schemathesis: after a 413 (or a 401) for a multi-megabyte body, the
next request on the same connection hung, because the unread rest of the
body sat in front of it. The server now closes such a connection.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import trio

from tests.conftest import with_settings


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, "connection closed before the response head"
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0].lower()


async def test_refused_before_the_body_is_read_says_connection_close(live):
    url = urlsplit(live.url)
    async with await trio.open_tcp_stream(url.hostname, url.port) as stream:
        # A client mid-upload of 4 MB, with no token: refused without reading it.
        await stream.send_all(
            b"POST /api/chat/sessions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 4194304\r\n\r\n"
            + b'{"title":"'
            + b"a" * 65536
        )
        with trio.fail_after(5):
            head = await _read_head(stream)
        assert head.startswith(b"http/1.1 401")
        assert b"\r\nconnection: close" in head


async def test_the_next_request_after_a_413_is_answered(live_factory, settings):
    live = await live_factory(with_settings(settings, max_body_bytes=1024))
    headers = {"Authorization": f"Bearer {live.harness.user()['token']}"}
    big = b'{"title":"' + b"x" * 4_000_000 + b'"}'
    r = await live.http.post("/api/chat/sessions", content=big, headers=headers)
    assert r.status_code == 413 and r.json()["errorCode"] == "PAYLOAD_TOO_LARGE"
    assert r.headers["connection"] == "close"
    with trio.fail_after(5):
        r = await live.http.get("/api/chat/sessions", headers=headers)
    assert r.status_code == 200


async def test_a_read_body_keeps_the_connection(live):
    headers = {"Authorization": f"Bearer {live.harness.user()['token']}"}
    r = await live.http.post("/api/chat/sessions", json={"title": 5}, headers=headers)
    assert r.status_code == 400
    assert r.headers.get("connection") != "close"
