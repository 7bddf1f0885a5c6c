"""``chinwag fake-bedrock``: a local server speaking Bedrock runtime's Converse wire protocol.

A minimal HTTP/1.1 server written directly on trio sockets (keep-alive,
``Content-Length`` request bodies). It answers

- ``POST /model/{modelId}/converse-stream``: ``200`` with
  ``application/vnd.amazon.eventstream`` frames in a chunked body:
  ``messageStart``, one ``contentBlockDelta`` per token, ``contentBlockStop``,
  ``messageStop``, ``metadata``;
- ``POST /model/{modelId}/converse``: the same answer as one JSON body;
- ``/_fake/...``: control and inspection (faults, settings, connection record).

The answer is deterministic: :func:`answer_tokens` of the last user message,
``min(answer_tokens, maxTokens)`` tokens long. SigV4 headers are ignored.

Faults (:data:`FAULTS`) are chosen per model request, first match wins:
a ``[[fault:NAME]]`` marker in the prompt, then the queue filled by
``POST /_fake/faults {"fault": NAME, "count": N}`` (``count: null`` = until
``DELETE /_fake/faults``), then ``FakeSettings.fault`` (the CLI's ``--fault``).

Every TCP connection is recorded (:class:`ConnectionRecord`). Its close is
noticed at once: a reader task per connection watches the socket for EOF
while the response is idle, slow or hanging, and a send to a gone peer fails
while streaming; either sets ``closed_at`` and the record's ``closed`` event.
Every connection handler is owned by the ``serve()`` nursery.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http
import json
import logging
import math
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from email.utils import formatdate
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import trio

from .base import estimate_tokens
from .eventstream import event_frame, exception_frame

log = logging.getLogger("chinwag.fake_bedrock")
_DESCRIPTION = "A local server speaking Bedrock runtime's Converse wire protocol, with faults."


#: ``throttle`` 429 ThrottlingException; ``server_error`` 500 InternalServerException;
#: ``unavailable`` 503 ServiceUnavailableException; ``invalid`` 400 ValidationException;
#: ``break_midway`` a ``modelStreamErrorException`` frame after ``break_after_tokens``;
#: ``drop_midway`` the connection is dropped after ``break_after_tokens``;
#: ``slow`` tokens at ``slow_tokens_per_s``; ``hang`` read the request, send nothing;
#: ``hang_headers`` send the 200 headers, then nothing; ``hang_midway`` stop sending
#: after ``break_after_tokens``; ``none`` no fault (useful in the queue).
FAULTS = (
    "none", "throttle", "server_error", "unavailable", "invalid", "break_midway",
    "drop_midway", "slow", "hang", "hang_headers", "hang_midway",
)  # fmt: skip
_ERROR_FAULTS = {
    "throttle": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
    "server_error": (500, "InternalServerException", "The server encountered an error."),
    "unavailable": (503, "ServiceUnavailableException", "The service is unavailable."),
    "invalid": (400, "ValidationException", "The request is invalid (injected fault)."),
}
_MARKER = re.compile(r"\[\[fault:([a-z_]+)\]\]")
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_WORDS = (
    "the", "a", "model", "answers", "plainly", "with", "words", "that", "flow", "like",
    "a", "stream", "of", "small", "tokens", "and", "each", "one", "is", "sent",
    "as", "its", "own", "frame", "so", "clients", "can", "see", "text", "arrive",
    "quickly", "while", "the", "server", "keeps", "count", "of", "what", "it", "said",
)  # fmt: skip


def answer_tokens(prompt: str, n: int) -> list[str]:
    """The fake's deterministic answer to ``prompt``: ``n`` word tokens, each
    but the first with a leading space."""
    out: list[str] = []
    counter = 0
    seed = hashlib.sha256(prompt.encode("utf-8")).digest()
    while len(out) < n:
        for byte in hashlib.sha256(seed + counter.to_bytes(4, "big")).digest():
            word = _WORDS[byte % len(_WORDS)]
            out.append(word if not out else " " + word)
            if len(out) == n:
                break
        counter += 1
    return out


def answer_text(prompt: str, n: int) -> str:
    return "".join(answer_tokens(prompt, n))


@dataclass
class FakeSettings:
    ttft_ms: float = 50.0
    #: ``0`` = as fast as possible.
    tokens_per_s: float = 50.0
    answer_tokens: int = 200
    #: Default fault for every model request (``None`` = none).
    fault: str | None = None
    break_after_tokens: int = 3
    slow_tokens_per_s: float = 2.0

    _JSON: ClassVar[dict[str, str]] = {
        "ttftMs": "ttft_ms",
        "tokensPerS": "tokens_per_s",
        "answerTokens": "answer_tokens",
        "fault": "fault",
        "breakAfterTokens": "break_after_tokens",
        "slowTokensPerS": "slow_tokens_per_s",
    }

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, attr) for k, attr in self._JSON.items()}

    def update_from_json(self, body: dict[str, Any]) -> None:
        for key, value in body.items():
            attr = self._JSON.get(key)
            if attr is None:
                raise ValueError(f"unknown setting {key!r}")
            if attr == "fault":
                _check_fault(value, allow_none=True)
            setattr(self, attr, value)


def _check_fault(fault: object, *, allow_none: bool = False) -> None:
    if (fault is None and allow_none) or fault in FAULTS:
        return
    raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


@dataclass(eq=False)
class ConnectionRecord:
    """One upstream TCP connection. ``opened_at``/``closed_at`` are
    ``trio.current_time()``; ``*_wall`` are ``time.time()``. ``path``,
    ``model_id`` and ``fault`` are those of its latest request."""

    id: int
    opened_at: float
    opened_wall: float
    closed_at: float | None = None
    closed_wall: float | None = None
    path: str | None = None
    model_id: str | None = None
    tokens_sent: int = 0
    fault: str | None = None
    requests: int = 0
    closed: trio.Event = field(default_factory=trio.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "openedAt": self.opened_wall * 1000,
            "closedAt": None if self.closed_wall is None else self.closed_wall * 1000,
            "path": self.path,
            "modelId": self.model_id,
            "tokensSent": self.tokens_sent,
            "fault": self.fault,
            "requests": self.requests,
        }


@dataclass(eq=False)
class RequestRecord:
    """One model request (``converse`` or ``converse-stream``)."""

    id: int
    connection_id: int
    path: str
    model_id: str
    fault: str | None
    max_tokens: int | None
    status: int | None = None
    tokens_sent: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "connectionId": self.connection_id,
            "path": self.path,
            "modelId": self.model_id,
            "fault": self.fault,
            "maxTokens": self.max_tokens,
            "status": self.status,
            "tokensSent": self.tokens_sent,
        }


@dataclass
class _Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        return conn != "close" if self.version == "HTTP/1.1" else conn == "keep-alive"


class _Drop(Exception):
    """Close the connection now, without a proper end of response."""


class _BadRequest(Exception):
    pass


class _Peer:
    """One client socket: a reader task buffers incoming bytes and notices EOF."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self._more = trio.Event()

    async def read_until_eof(self, on_eof: Callable[[], None]) -> None:
        try:
            while data := await self.stream.receive_some(65536):
                self.buffer += data
                if len(self.buffer) > _MAX_HEAD + _MAX_BODY:
                    break
                self._more.set()
                self._more = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        on_eof()

    async def _wait_more(self) -> None:
        await self._more.wait()

    async def read_request(self) -> _Request:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > _MAX_HEAD:
                raise _BadRequest("request head too large")
            await self._wait_more()
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        try:
            method, target, version = head[0].split(" ")
        except ValueError as exc:
            raise _BadRequest(f"bad request line {head[0]!r}") from exc
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _BadRequest("chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            raise _BadRequest("bad content-length")
        del self.buffer[: end + 4]
        if headers.get("expect", "").lower() == "100-continue":
            await self.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self.buffer) < length:
            await self._wait_more()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return _Request(method, urlsplit(target).path, version, headers, body)


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [f"Date: {formatdate(usegmt=True)}", f"x-amzn-RequestId: {uuid.uuid4()}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _send_json(
    peer: _Peer, status: int, body: object, extra: tuple[tuple[str, str], ...] = ()
) -> None:
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra]
    await peer.stream.send_all(_head(status, headers) + data)


async def _send_error(peer: _Peer, status: int, error_type: str, message: str) -> None:
    kind = f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    await _send_json(peer, status, {"message": message}, (("x-amzn-ErrorType", kind),))


class FakeBedrock:
    """The fake. ``serve()`` runs it; the attributes are the in-process view."""

    def __init__(self, settings: FakeSettings | None = None) -> None:
        self.settings = settings or FakeSettings()
        self.connections: list[ConnectionRecord] = []
        self.requests: list[RequestRecord] = []
        self.port: int | None = None
        #: ``[fault, remaining or None (= until cleared)]`` in order.
        self._fault_queue: list[list[Any]] = []
        self._changed = trio.Event()

    # -- in-process API ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push_fault(self, fault: str, count: int | None = 1) -> None:
        """Apply ``fault`` to the next ``count`` model requests (``None``: all, until cleared)."""
        _check_fault(fault)
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 or None")
        self._fault_queue.append([fault, count])

    def clear_faults(self) -> None:
        self._fault_queue.clear()

    def connection(self, conn_id: int) -> ConnectionRecord:
        return self.connections[conn_id - 1]

    async def wait_closed(self, conn_id: int) -> ConnectionRecord:
        record = self.connection(conn_id)
        await record.closed.wait()
        return record

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds; re-checked on every change of the record."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- serving ----------------------------------------------------------------

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (``0`` = any free port), call
        ``task_status.started(actual_port)``, serve until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def _mark_closed(self, record: ConnectionRecord) -> None:
        if record.closed_at is None:
            record.closed_at = trio.current_time()
            record.closed_wall = time.time()
            record.closed.set()
            self._notify()

    async def _handle(self, stream: trio.SocketStream) -> None:
        record = ConnectionRecord(len(self.connections) + 1, trio.current_time(), time.time())
        self.connections.append(record)
        self._notify()
        peer = _Peer(stream)
        try:
            async with trio.open_nursery() as nursery:

                def on_eof() -> None:
                    self._mark_closed(record)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(peer.read_until_eof, on_eof)
                try:
                    await self._serve_requests(peer, record)
                except (trio.BrokenResourceError, trio.ClosedResourceError, _Drop):
                    pass
                except _BadRequest as exc:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await _send_error(peer, 400, "SerializationException", str(exc))
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("fake-bedrock: connection %d failed", record.id)
        finally:
            await trio.aclose_forcefully(stream)
            self._mark_closed(record)

    async def _serve_requests(self, peer: _Peer, record: ConnectionRecord) -> None:
        while True:
            req = await peer.read_request()
            record.requests += 1
            record.path = req.path
            self._notify()
            await self._dispatch(peer, record, req)
            if not req.keep_alive:
                return

    async def _dispatch(self, peer: _Peer, record: ConnectionRecord, req: _Request) -> None:
        parts = req.path.split("/")
        if (
            req.method == "POST"
            and len(parts) == 4
            and parts[1] == "model"
            and parts[3] in ("converse-stream", "converse")
        ):
            await self._model_call(peer, record, req, unquote(parts[2]), parts[3] == "converse")
            return
        if req.path.startswith("/_fake/"):
            await self._control(peer, req)
            return
        await _send_error(peer, 404, "UnknownOperationException", f"no route {req.path}")

    async def _control(self, peer: _Peer, req: _Request) -> None:
        key = (req.method, req.path)
        try:
            body = json.loads(req.body) if req.body else {}
            if key == ("POST", "/_fake/faults"):
                self.push_fault(str(body.get("fault")), body.get("count", 1))
            elif key == ("DELETE", "/_fake/faults"):
                self.clear_faults()
            elif key == ("PUT", "/_fake/settings"):
                self.settings.update_from_json(body)
            elif key == ("GET", "/_fake/connections"):
                await _send_json(peer, 200, [c.to_json() for c in self.connections])
                return
            elif key == ("GET", "/_fake/requests"):
                await _send_json(peer, 200, [r.to_json() for r in self.requests])
                return
            elif key not in {("GET", "/_fake/faults"), ("GET", "/_fake/settings")}:
                await _send_json(peer, 404, {"message": f"no route {req.method} {req.path}"})
                return
        except (ValueError, TypeError, AttributeError) as exc:
            await _send_json(peer, 400, {"message": str(exc)})
            return
        queue = [{"fault": f, "count": n} for f, n in self._fault_queue]
        state = {"faults": queue, "settings": self.settings.to_json()}
        await _send_json(peer, 200, state)

    def _choose_fault(self, texts: list[str]) -> str | None:
        for text in texts:
            if (m := _MARKER.search(text)) and m.group(1) in FAULTS:
                fault: str | None = m.group(1)
                break
        else:
            if self._fault_queue:
                head = self._fault_queue[0]
                fault = head[0]
                if head[1] is not None:
                    head[1] -= 1
                    if head[1] == 0:
                        self._fault_queue.pop(0)
            else:
                fault = self.settings.fault
        return None if fault == "none" else fault

    async def _model_call(
        self, peer: _Peer, record: ConnectionRecord, req: _Request, model_id: str, unary: bool
    ) -> None:
        record.model_id = model_id
        try:
            prompt, texts, max_tokens = _parse_converse(req.body)
        except _BadRequest as exc:
            await _send_error(peer, 400, "ValidationException", str(exc))
            return
        fault = self._choose_fault(texts)
        record.fault = fault
        call = RequestRecord(
            len(self.requests) + 1, record.id, req.path, model_id, fault, max_tokens
        )
        self.requests.append(call)
        self._notify()
        log.info("fake-bedrock: %s %s fault=%s", req.method, req.path, fault)
        s = self.settings
        n = s.answer_tokens if max_tokens is None else min(s.answer_tokens, max_tokens)
        tokens = answer_tokens(prompt, n)
        plan = _Plan(
            fault,
            tokens,
            "max_tokens" if n < s.answer_tokens else "end_turn",
            sum(estimate_tokens(t) for t in texts),
            s,
            trio.current_time(),
        )
        if fault in _ERROR_FAULTS:
            status, error_type, message = _ERROR_FAULTS[fault]
            call.status = status
            await _send_error(peer, status, error_type, message)
            return
        if fault == "hang":
            await trio.sleep_forever()

        def sent_one() -> None:
            record.tokens_sent += 1
            call.tokens_sent += 1
            self._notify()

        call.status = 200
        if unary:
            await plan.unary(peer, sent_one)
        else:
            await plan.stream(peer, sent_one, chunked=req.version == "HTTP/1.1")
            if req.version != "HTTP/1.1":
                raise _Drop  # a close-delimited body ends with the connection


def _parse_converse(body: bytes) -> tuple[str, list[str], int | None]:
    """(last user message text, every text of the request, maxTokens) or _BadRequest."""
    try:
        doc = json.loads(body or b"{}")
        messages = doc["messages"]
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list")
        texts = [str(block.get("text", "")) for m in messages for block in m["content"]]
        texts += [str(block.get("text", "")) for block in doc.get("system") or []]
        user = [m for m in messages if m.get("role") == "user"]
        prompt = "".join(str(b.get("text", "")) for b in (user[-1]["content"] if user else []))
        max_tokens = (doc.get("inferenceConfig") or {}).get("maxTokens")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _BadRequest(f"malformed Converse request: {exc}") from exc
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise _BadRequest("inferenceConfig.maxTokens must be an integer >= 1")
    return prompt, texts, max_tokens


@dataclass
class _Plan:
    """How one model answer is produced: tokens, timing and the fault."""

    fault: str | None
    tokens: list[str]
    stop_reason: str
    input_tokens: int
    settings: FakeSettings
    t0: float

    def _interval(self) -> float:
        s = self.settings
        rate = s.slow_tokens_per_s if self.fault == "slow" else s.tokens_per_s
        return 1.0 / rate if rate > 0 else 0.0

    def _metadata(self, sent: int) -> dict[str, Any]:
        return {
            "usage": {
                "inputTokens": self.input_tokens,
                "outputTokens": sent,
                "totalTokens": self.input_tokens + sent,
            },
            "metrics": {"latencyMs": math.ceil((trio.current_time() - self.t0) * 1000)},
        }

    async def stream(self, peer: _Peer, sent_one: Callable[[], None], *, chunked: bool) -> None:
        frame = _chunk if chunked else bytes
        send = peer.stream.send_all
        encoding = ("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")
        await send(_head(200, [("Content-Type", "application/vnd.amazon.eventstream"), encoding]))
        if self.fault == "hang_headers":
            await trio.sleep_forever()
        await trio.sleep(self.settings.ttft_ms / 1000)
        await send(frame(event_frame("messageStart", {"role": "assistant"})))
        start, interval = trio.current_time(), self._interval()
        break_at = self.settings.break_after_tokens
        for i, token in enumerate([*self.tokens, None]):
            if self.fault in ("break_midway", "drop_midway", "hang_midway") and i == break_at:
                if self.fault == "drop_midway":
                    raise _Drop
                if self.fault == "hang_midway":
                    await trio.sleep_forever()
                error = exception_frame("modelStreamErrorException", "The model stream broke.")
                await send(frame(error) + (b"0\r\n\r\n" if chunked else b""))
                return
            if token is None:
                break
            if i and interval:
                await trio.sleep_until(start + i * interval)
            delta = {"contentBlockIndex": 0, "delta": {"text": token}}
            await send(frame(event_frame("contentBlockDelta", delta)))
            sent_one()
        sent = len(self.tokens)
        tail = [
            event_frame("contentBlockStop", {"contentBlockIndex": 0}),
            event_frame("messageStop", {"stopReason": self.stop_reason}),
            event_frame("metadata", self._metadata(sent)),
        ]
        await send(b"".join(frame(f) for f in tail) + (b"0\r\n\r\n" if chunked else b""))

    async def unary(self, peer: _Peer, sent_one: Callable[[], None]) -> None:
        if self.fault in ("hang_headers", "hang_midway"):
            await trio.sleep_forever()
        if self.fault == "drop_midway":
            raise _Drop
        if self.fault == "break_midway":
            await _send_error(peer, 424, "ModelErrorException", "The model broke.")
            return
        interval = self._interval()
        await trio.sleep(self.settings.ttft_ms / 1000 + interval * max(0, len(self.tokens) - 1))
        for _ in self.tokens:
            sent_one()
        message = {"role": "assistant", "content": [{"text": "".join(self.tokens)}]}
        body = {
            "output": {"message": message},
            "stopReason": self.stop_reason,
            **self._metadata(len(self.tokens)),
        }
        await _send_json(peer, 200, body)


# -- command line -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FakeSettings()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 = any free port")
    parser.add_argument("--ttft-ms", type=float, default=d.ttft_ms)
    parser.add_argument("--tokens-per-s", type=float, default=d.tokens_per_s, help="0 = no delay")
    parser.add_argument("--answer-tokens", type=int, default=d.answer_tokens)
    parser.add_argument("--fault", choices=FAULTS, default=None, help="default fault")
    parser.add_argument("--break-after-tokens", type=int, default=d.break_after_tokens)
    parser.add_argument("--slow-tokens-per-s", type=float, default=d.slow_tokens_per_s)


async def _run(fake: FakeBedrock, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(fake.serve, host, port)
            print(f"fake-bedrock listening on http://{host}:{bound}", flush=True)
            async for signum in signals:
                log.info("fake-bedrock: %s, shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()


def run_from_args(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = {f.name for f in fields(FakeSettings)}
    settings = FakeSettings(**{k: v for k, v in vars(args).items() if k in names})
    trio.run(_run, FakeBedrock(settings), args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chinwag fake-bedrock", description=_DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
