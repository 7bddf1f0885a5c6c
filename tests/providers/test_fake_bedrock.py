"""FakeBedrock on its own, over raw HTTP: control endpoints, faults, the
connection record, and the CLI in a subprocess."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from server.providers.eventstream import FrameDecoder
from server.providers.fake_bedrock import FakeBedrock, answer_text

ROOT = Path(__file__).resolve().parents[2]
STREAM_PATH = "/model/amazon.nova-micro-v1%3A0/converse-stream"


def converse_body(text: str, max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": [{"text": text}]}]}
    if max_tokens is not None:
        body["inferenceConfig"] = {"maxTokens": max_tokens}
    return body


def request_bytes(method: str, path: str, body: object = None, *, close: bool = True) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
    head += "Connection: close\r\n" if close else ""
    return head.encode() + b"\r\n" + data


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


async def http(port: int, method: str, path: str, body: object = None):
    """One request with ``Connection: close``: (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request_bytes(method, path, body))
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        payload = dechunk(payload)
    return int(lines[0].split()[1]), headers, payload


async def test_stream_speaks_event_stream(fake: FakeBedrock) -> None:
    status, headers, body = await http(fake.port, "POST", STREAM_PATH, converse_body("hi", 5))
    assert status == 200
    assert headers["content-type"] == "application/vnd.amazon.eventstream"
    decoder = FrameDecoder()
    decoder.feed(body)
    frames = list(decoder)
    kinds = [f.headers[":event-type"] for f in frames]
    assert kinds == ["messageStart"] + ["contentBlockDelta"] * 5 + [
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    text = "".join(json.loads(f.payload)["delta"]["text"] for f in frames[1:6])
    assert text == answer_text("hi", 5)
    assert json.loads(frames[-2].payload) == {"stopReason": "max_tokens"}
    assert json.loads(frames[-1].payload)["usage"]["outputTokens"] == 5
    (conn,) = fake.connections
    assert (conn.model_id, conn.tokens_sent, conn.path) == (
        "amazon.nova-micro-v1:0",
        5,
        STREAM_PATH,
    )


async def test_control_endpoints_and_fault_queue(fake: FakeBedrock) -> None:
    status, _, _ = await http(fake.port, "POST", "/_fake/faults", {"fault": "throttle", "count": 2})
    assert status == 200
    await http(fake.port, "POST", "/_fake/faults", {"fault": "unavailable"})
    _, _, body = await http(fake.port, "GET", "/_fake/faults")
    assert json.loads(body)["faults"] == [
        {"fault": "throttle", "count": 2},
        {"fault": "unavailable", "count": 1},
    ]
    statuses = []
    for _ in range(4):
        status, headers, body = await http(fake.port, "POST", STREAM_PATH, converse_body("x"))
        statuses.append(status)
        if status == 429:
            assert headers["x-amzn-errortype"].startswith("ThrottlingException:")
            assert "message" in json.loads(body)
    assert statuses == [429, 429, 503, 200]
    await http(fake.port, "POST", "/_fake/faults", {"fault": "server_error", "count": None})
    await http(fake.port, "DELETE", "/_fake/faults")
    assert (await http(fake.port, "POST", STREAM_PATH, converse_body("x")))[0] == 200
    assert (await http(fake.port, "POST", "/_fake/faults", {"fault": "nope"}))[0] == 400

    _, _, body = await http(fake.port, "GET", "/_fake/connections")
    records = json.loads(body)
    assert set(records[0]) >= {
        "id",
        "openedAt",
        "closedAt",
        "path",
        "modelId",
        "tokensSent",
        "fault",
    }
    assert records[-1]["closedAt"] is None  # the connection answering this request
    assert all(r["closedAt"] >= r["openedAt"] for r in records[:-1])
    assert [r["fault"] for r in records if r["modelId"]] == [
        "throttle",
        "throttle",
        "unavailable",
        None,
        None,
    ]


async def test_prompt_marker_and_validation(fake: FakeBedrock) -> None:
    status, headers, _ = await http(
        fake.port, "POST", STREAM_PATH, converse_body("[[fault:invalid]]")
    )
    assert (status, headers["x-amzn-errortype"].split(":")[0]) == (400, "ValidationException")
    status, _, _ = await http(fake.port, "POST", STREAM_PATH, {"messages": []})
    assert status == 400
    status, _, body = await http(fake.port, "POST", "/model/m/converse", converse_body("hi", 3))
    assert status == 200
    doc = json.loads(body)
    assert doc["output"]["message"]["content"][0]["text"] == answer_text("hi", 3)
    assert doc["stopReason"] == "max_tokens"


async def test_keep_alive_serves_requests_on_one_connection(fake: FakeBedrock) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
    async with stream:
        for _ in range(2):
            await stream.send_all(request_bytes("GET", "/_fake/settings", close=False))
            raw = b""
            while b"}" not in raw:  # one small JSON body
                raw += await stream.receive_some(65536)
            assert raw.startswith(b"HTTP/1.1 200 OK")
    assert len(fake.connections) == 1
    assert fake.connections[0].requests == 2


async def test_close_seen_at_once_while_hanging(fake: FakeBedrock) -> None:
    """The client goes away while the fake sends nothing: the EOF watcher
    records the close, no token send needed."""
    stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
    await stream.send_all(request_bytes("POST", STREAM_PATH, converse_body("[[fault:hang]]")))
    await fake.wait_until(lambda: len(fake.requests) == 1)
    (conn,) = fake.connections
    assert not conn.closed.is_set()
    closed_by_client = trio.current_time()
    await stream.aclose()
    with trio.fail_after(1):
        await fake.wait_closed(conn.id)
    assert conn.closed_at is not None
    assert conn.closed_at - closed_by_client < 1.0  # seen on the close, not at a timeout


async def test_cli_subprocess_prints_port_and_stops_on_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "server.providers.fake_bedrock",
        "--port",
        "0",
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "0",
        "--answer-tokens",
        "4",
    ]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            run = partial(trio.run_process, command, cwd=ROOT, stdout=subprocess.PIPE, check=False)
            process = await nursery.start(run)
            line = b""
            while b"\n" not in line:
                line += await process.stdout.receive_some(1024)
            port = int(re.search(rb"http://127\.0\.0\.1:(\d+)", line).group(1))
            status, _, body = await http(port, "POST", STREAM_PATH, converse_body("cli"))
            assert status == 200
            decoder = FrameDecoder()
            decoder.feed(body)
            assert len(list(decoder)) == 1 + 4 + 3
            process.send_signal(signal.SIGTERM)
        assert process.returncode == 0


async def test_malformed_request_gets_400_and_close(fake: FakeBedrock) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
    async with stream:
        await stream.send_all(b"NONSENSE\r\n\r\n")
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 400 ")
    with trio.fail_after(1):
        await fake.wait_closed(1)
