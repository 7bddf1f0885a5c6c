"""The Bedrock provider: ``ConverseStream`` through aiobotocore, driven from Trio.

One request shape for every model family (the Converse API: ``modelId``,
``messages``, ``system``, ``inferenceConfig``); no per-model prompt formats.

aiobotocore is asyncio-only, so every call into it goes through
``trio_asyncio.aio_as_trio``. That needs a trio-asyncio loop in the task
context: the app runs inside ``async with trio_asyncio.open_loop():`` (the
tests do the same).

Guarantees:

- :meth:`BedrockProvider.open` creates one client (one connection pool) for
  the app's life and closes it on exit.
- ``stream()`` does no I/O when entered; the upstream call starts at the
  first ``__anext__``. Events: :class:`Started` (with the retries botocore
  made before the call was accepted), :class:`TextDelta`..., at most one
  :class:`Usage`, then :class:`Stop` — or a :class:`ProviderError`.
- Leaving the ``stream()`` block for any reason, cancellation included,
  closes the upstream HTTP connection at once (the event stream's
  ``close()``, shielded, in a ``finally``): a cancelled read alone would
  leave the socket open and Bedrock streaming into its buffer.
- botocore/aiohttp exceptions are translated here (:func:`_translate`) and
  nowhere else; callers see only the :mod:`.base` error family.

Logs carry model ids, error codes and messages, never credentials or
request headers.
"""

from __future__ import annotations

import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import trio
import trio_asyncio
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.eventstream import ParserError as EventStreamParserError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EventStreamError,
    ParamValidationError,
    ReadTimeoutError,
)

from .base import (
    InvalidRequest,
    ModelEvent,
    ModelRequest,
    ProviderError,
    Started,
    Stop,
    TextDelta,
    Throttled,
    UpstreamFailure,
    UpstreamTimeout,
    Usage,
    storable,
)

log = logging.getLogger("chinwag.providers.bedrock")

_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}

# Error codes, lower-cased: HTTP errors say ``ThrottlingException``, in-stream
# exception frames say ``throttlingException``.
_THROTTLED = {"throttlingexception", "toomanyrequestsexception", "servicequotaexceededexception",
              "modelnotreadyexception"}  # fmt: skip
_TIMEOUT = {"modeltimeoutexception"}
_INVALID = {"validationexception", "accessdeniedexception", "resourcenotfoundexception",
            "unrecognizedclientexception"}  # fmt: skip
#: 4xx codes that are the model's failure, not the request's (ModelErrorException is a 424).
_FAILURE = {"modelerrorexception", "modelstreamerrorexception"}

#: Attempts made by the current ``converse_stream`` call: a one-item list set
#: by the calling task, bumped by a ``before-send`` hook (one per HTTP attempt).
#: asyncio tasks copy the context they are created in, so the hook running in
#: aiobotocore's task sees the counter of the Trio task that made the call.
_ATTEMPTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "chinwag_bedrock_attempts", default=None
)


def _count_attempt(**_: Any) -> None:
    counter = _ATTEMPTS.get()
    if counter is not None:
        counter[0] += 1


def _translate(exc: Exception, retries: int) -> ProviderError | None:
    """The :mod:`.base` error for a botocore/aiohttp exception, or ``None`` if it is not one."""
    if isinstance(exc, ClientError):  # EventStreamError included
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code", ""))
        status = int(meta.get("HTTPStatusCode") or 0)
        retries = int(meta.get("RetryAttempts", retries))
        detail = f"{code or 'error'} (HTTP {status or '-'}): {error.get('Message', '')}"
        if isinstance(exc, EventStreamError):
            detail = f"in-stream {detail}"
        key = code.lower()
        if key in _THROTTLED or status == 429:
            return Throttled(detail, retries=retries)
        if key in _TIMEOUT or status == 408:
            return UpstreamTimeout(detail, retries=retries)
        if key in _FAILURE:
            return UpstreamFailure(detail, retries=retries)
        if key in _INVALID or (400 <= status < 500 and not isinstance(exc, EventStreamError)):
            return InvalidRequest(detail, retries=retries)
        return UpstreamFailure(detail, retries=retries)
    detail = f"{type(exc).__name__}: {exc}"
    # Timeouts first: ConnectTimeoutError is also a ConnectionError, and
    # aiohttp's read timeout is also a ClientError.
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError | TimeoutError):
        return UpstreamTimeout(detail, retries=retries)
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(detail, retries=retries)
    if isinstance(exc, BotoCoreError | aiohttp.ClientError | EventStreamParserError | OSError):
        return UpstreamFailure(detail, retries=retries)
    return None


_END = object()


async def _aio_next(iterator: Any) -> Any:
    """asyncio-flavoured: the next item of an asyncio async iterator, or ``_END``."""
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return _END


async def _aio_close(event_stream: Any, iterator: Any) -> None:
    """asyncio-flavoured: drop the connection, then finalize the parser's generator."""
    event_stream.close()
    if iterator is not None:
        await iterator.aclose()


class _ConverseEvents:
    """The async iterator ``stream()`` yields: one ConverseStream call."""

    def __init__(self, client: Any, request: ModelRequest) -> None:
        self._client = client
        self._request = request
        self._pending: deque[ModelEvent] = deque()
        self._state = "new"  # -> "streaming" -> "done"
        self._event_stream: Any = None
        self._iterator: Any = None
        self._stop: str | None = None
        self._retries = 0

    def __aiter__(self) -> _ConverseEvents:
        return self

    async def __anext__(self) -> ModelEvent:
        while not self._pending:
            if self._state == "done":
                raise StopAsyncIteration
            try:
                if self._state == "new":
                    await self._start()
                else:
                    await self._pull()
            except Exception as exc:
                self._state = "done"
                mapped = _translate(exc, self._retries)
                if mapped is None:
                    raise
                log.warning("bedrock %s: %s", self._request.model_id, mapped.detail)
                raise mapped from exc
        return self._pending.popleft()

    def _call_args(self) -> dict[str, Any]:
        r = self._request
        inference: dict[str, Any] = {"maxTokens": r.max_tokens}
        if r.temperature is not None:
            inference["temperature"] = r.temperature
        args: dict[str, Any] = {
            "modelId": r.model_id,
            "messages": [{"role": t.role, "content": [{"text": t.text}]} for t in r.messages],
            "inferenceConfig": inference,
        }
        if r.system:
            args["system"] = [{"text": r.system}]
        return args

    async def _start(self) -> None:
        counter = [0]
        token = _ATTEMPTS.set(counter)
        try:
            response = await trio_asyncio.aio_as_trio(self._client.converse_stream)(
                **self._call_args()
            )
        except Exception:
            self._retries = max(0, counter[0] - 1)
            raise
        finally:
            _ATTEMPTS.reset(token)
        self._event_stream = response["stream"]
        self._iterator = self._event_stream.__aiter__()
        meta = response.get("ResponseMetadata", {})
        self._retries = int(meta.get("RetryAttempts", max(0, counter[0] - 1)))
        self._state = "streaming"
        self._pending.append(Started(retries=self._retries))

    async def _pull(self) -> None:
        event = await trio_asyncio.aio_as_trio(_aio_next)(self._iterator)
        if event is _END:
            self._state = "done"
            if self._stop is None:
                raise UpstreamFailure("stream ended before messageStop", retries=self._retries)
            self._pending.append(Stop(self._stop))  # type: ignore[arg-type]
        elif "contentBlockDelta" in event:
            text = event["contentBlockDelta"].get("delta", {}).get("text")
            if text:
                self._pending.append(TextDelta(storable(text)))
        elif "messageStop" in event:
            reason = event["messageStop"].get("stopReason", "")
            if reason not in _STOP_REASONS:
                log.info("bedrock %s: stopReason %r read as stop", self._request.model_id, reason)
            self._stop = _STOP_REASONS.get(reason, "stop")
        elif "metadata" in event:
            usage = event["metadata"].get("usage")
            if usage:
                self._pending.append(Usage(usage["inputTokens"], usage["outputTokens"]))

    async def aclose(self) -> None:
        """Close the upstream connection now (idempotent; safe under cancellation)."""
        self._state = "done"
        event_stream, self._event_stream = self._event_stream, None
        if event_stream is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio_asyncio.aio_as_trio(_aio_close)(event_stream, self._iterator)


class BedrockProvider:
    """:class:`~server.providers.base.Provider` for AWS Bedrock runtime (Converse API)."""

    name = "bedrock"

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        max_attempts: int = 3,
        connect_timeout: float = 5,
        read_timeout: float = 120,
    ) -> AsyncIterator[BedrockProvider]:
        """One ``bedrock-runtime`` client for the block's life (closed on exit).

        Must run inside ``trio_asyncio.open_loop()``. Credentials and region
        come from the standard AWS environment when not given. botocore's
        ``standard`` retry mode makes at most ``max_attempts`` attempts
        (throttling, 5xx, connection errors, timeouts) before the first byte
        of the stream; nothing is retried once streaming began.
        """
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Note: aiobotocore's aiohttp session does not apply socket options yet.
            tcp_keepalive=True,
        )
        creator = get_session().create_client(
            "bedrock-runtime", region_name=region, endpoint_url=endpoint_url, config=config
        )
        client = await trio_asyncio.aio_as_trio(creator.__aenter__)()
        try:
            client.meta.events.register(
                "before-send.bedrock-runtime.ConverseStream", _count_attempt
            )
            yield cls(client)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await trio_asyncio.aio_as_trio(creator.__aexit__)(None, None, None)

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        events = _ConverseEvents(self._client, request)
        try:
            yield events
        finally:
            await events.aclose()
