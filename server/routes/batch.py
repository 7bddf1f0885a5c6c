"""``POST /api/batch`` (alias ``/api/v1/batch``), SPEC §8: many calls in one.

Each item is dispatched in-process through the app's own ASGI interface,
as a request of its own: the caller's ``Authorization`` header, the item's
JSON body, an ``X-Request-Id`` derived from the batch's. So an item meets
the very same auth, role, validation, rate limit and error handlers as a
direct call, and nothing in the item (it has no headers) can change who it
runs as. The items run concurrently in one nursery: a slow item holds up
only the batch's answer, never another item; if the caller goes away, the
handler is cancelled and the nursery cancels every item still running.

Refused per item, without being dispatched (a 400 in that item's place):
streaming paths (``…/stream``, ``…/observe``, ``…/observe/ws``,
``/api/v1/chat``, or any route that answers ``text/event-stream``) and a
nested batch.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import trio
from quart import Blueprint, current_app, g, request
from werkzeug.exceptions import HTTPException

from ..context import authenticated
from ..errors import ApiError, ValidationError
from ..validate import EVENT_STREAM, Body, operation

log = logging.getLogger("chinwag")

bp = Blueprint("batch", __name__)

MAX_ITEMS = 20
MAX_PATH = 2048
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_METHOD_NAMES = (*METHODS, *(m.lower() for m in METHODS))
_PATH_PREFIX = "/api/"
# Known by path too, so a refusal never depends on how a route is declared.
_STREAMING_PATH = re.compile(
    r"^/api/(?:chat/sessions/[^/]+/(?:stream|observe|observe/ws)|v1/chat)/*$"
)
_BATCH_PATH = re.compile(r"^/api/(?:v1/)?batch/*\Z")
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY = _SAFE_PATH + "?"


@dataclass(frozen=True, slots=True)
class Item:
    """One checked batch item, in the form an ASGI scope wants."""

    method: str
    path: str  # percent-decoded, as ASGI's scope["path"]
    raw_path: bytes
    query: bytes
    body: bytes | None


def _item_error(index: int, part: str, message: str) -> ValidationError:
    return ValidationError(
        f"requests[{index}]: {message}",
        details=[{"field": f"requests[{index}]{part}", "index": index}],
    )


def _item(index: int, raw: Any) -> Item:
    if not isinstance(raw, dict):
        raise _item_error(index, "", "each request must be an object.")
    method = raw.get("method")
    if not isinstance(method, str) or method not in _METHOD_NAMES:
        raise _item_error(index, ".method", f"'method' must be one of {', '.join(METHODS)}.")
    path = raw.get("path")
    if not isinstance(path, str) or not path.startswith(_PATH_PREFIX) or len(path) > MAX_PATH:
        raise _item_error(
            index,
            ".path",
            f"'path' must be a string starting with {_PATH_PREFIX} "
            f"(at most {MAX_PATH} characters).",
        )
    body = raw.get("body")
    if body is not None and not isinstance(body, dict):
        raise _item_error(index, ".body", "'body' must be a JSON object (or absent).")
    where, _, query = path.partition("?")
    # A path as a client writes it in a URL: anything unsafe is percent-encoded.
    raw_path = quote(where, safe=_SAFE_PATH, errors="surrogatepass")
    return Item(
        method=method.upper(),
        path=unquote(raw_path),
        raw_path=raw_path.encode("ascii"),
        query=quote(query, safe=_SAFE_QUERY, errors="surrogatepass").encode("ascii"),
        body=None if body is None else json.dumps(body).encode(),
    )


@dataclass(frozen=True)
class Requests:
    """The ``requests`` field: a list of at most 20 ``{method, path, body?}``."""

    required: bool = True

    def parse(self, body: Mapping[str, Any], name: str) -> list[Item]:
        value = body.get(name)
        if not isinstance(value, list):
            raise ValidationError(
                f"'{name}' must be a list of requests.", details=[{"field": name}]
            )
        if len(value) > MAX_ITEMS:
            raise ValidationError(
                f"A batch holds at most {MAX_ITEMS} requests ({len(value)} sent).",
                details=[{"field": name}],
            )
        return [_item(i, raw) for i, raw in enumerate(value)]

    def schema(self) -> dict[str, Any]:
        return {
            "type": "array",
            "maxItems": MAX_ITEMS,
            "description": "Run concurrently, answered in this order. Streaming paths and "
            "nested batches are refused per item.",
            "items": {
                "type": "object",
                "properties": {
                    "method": {"type": "string", "enum": list(_METHOD_NAMES)},
                    "path": {
                        "type": "string",
                        "pattern": "^/api/",
                        "maxLength": MAX_PATH,
                        "description": "May carry a query string.",
                    },
                    "body": {"type": ["object", "null"], "description": "A JSON object."},
                },
                "required": ["method", "path"],
            },
        }


BATCH = Body({"requests": Requests()})


def _refusal(item: Item) -> ApiError | None:
    """Why ``item`` may not run in a batch, or None."""
    nested = ApiError(
        "A batch cannot contain another batch.", status=400, error_code="NESTED_BATCH"
    )
    streaming = ApiError(
        "Streaming is not available in a batch: call this path on its own.",
        status=400,
        error_code="STREAMING_NOT_IN_BATCH",
    )
    if _BATCH_PATH.match(item.path):
        return nested
    if _STREAMING_PATH.match(item.path):
        return streaming
    app = current_app
    try:
        rule, _ = app.url_map.bind("chinwag").match(item.path, method=item.method, return_rule=True)
    except HTTPException:
        return None  # no such route (or method): the app answers it as it would directly
    view = app.view_functions.get(rule.endpoint)
    if view is batch:
        return nested
    op = getattr(view, "__chinwag_operation__", None)
    if getattr(rule, "websocket", False) or (op is not None and op.produces == EVENT_STREAM):
        return streaming
    return None


async def _dispatch(
    app: Any, base: Mapping[str, Any], headers: list[tuple[bytes, bytes]], item: Item
) -> dict[str, Any]:
    """Run ``item`` through the app's ASGI interface; its status and JSON body."""
    body = item.body or b""
    if item.body is not None:
        headers = [
            *headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": base.get("http_version", "1.1"),
        "method": item.method,
        "scheme": base.get("scheme", "http"),
        "path": item.path,
        "raw_path": item.raw_path,
        "query_string": item.query,
        "root_path": "",
        "headers": headers,
        "client": base.get("client"),
        "server": base.get("server"),
        "extensions": {},
    }
    if "state" in base:
        scope["state"] = base["state"]
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await trio.sleep_forever()  # no disconnect: cancelling the batch cancels us
        raise AssertionError("unreachable")

    status = 500
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    # A fresh app context, so the item has its own ``g`` (request id, principal)
    # rather than sharing the batch's through the inherited context.
    async with app.app_context():
        await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        answer: Any = json.loads(raw) if raw else None
    except ValueError:
        answer = raw.decode("utf-8", "replace")
    return {"status": status, "body": answer}


@bp.post("/api/batch")
@authenticated()
@operation(
    "Run up to 20 API calls in one, concurrently, as the caller",
    body=BATCH,
    description="Each item is `{status, body}` of its own call, in request order: an item's "
    "error is that item's, never the batch's. Each item counts against the caller's rate "
    "limit like a direct call. Streaming paths and nested batches are refused per item "
    "(400 `STREAMING_NOT_IN_BATCH`, `NESTED_BATCH`).",
)
async def batch(body: dict[str, Any]) -> dict[str, Any]:
    items: list[Item] = body["requests"]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    base: Mapping[str, Any] = request.scope
    request_id: str = g.request_id
    headers: list[tuple[bytes, bytes]] = [(b"accept", b"application/json")]
    for name in ("Host", "Authorization", "User-Agent"):
        value = request.headers.get(name)
        if value is not None:
            headers.append((name.lower().encode(), value.encode("latin-1")))
    responses: list[dict[str, Any] | None] = [None] * len(items)

    async def run(index: int, item: Item) -> None:
        item_headers = [*headers, (b"x-request-id", f"{request_id[:120]}.{index}".encode())]
        try:
            responses[index] = await _dispatch(app, base, item_headers, item)
        except Exception:
            log.exception("batch item %d (%s %s) failed", index, item.method, item.path)
            responses[index] = {
                "status": 500,
                "body": {"message": "Internal server error.", "errorCode": "INTERNAL_ERROR"},
            }

    async with trio.open_nursery() as nursery:
        for index, item in enumerate(items):
            refusal = _refusal(item)
            if refusal is None:
                nursery.start_soon(run, index, item)
            else:
                responses[index] = {"status": refusal.status, "body": refusal.body()}
    return {
        "success": True,
        "data": {
            "responses": responses,
            "count": len(responses),
            "timestamp": int(time.time() * 1000),
        },
    }


# The alias: the same view under its own endpoint (an OpenAPI operationId is unique).
bp.add_url_rule("/api/v1/batch", "batch_v1", batch, methods=["POST"])
