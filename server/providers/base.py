"""The provider seam: every model backend looks like this to the rest of chinwag.

A provider turns a :class:`ModelRequest` into an ordered stream of
:data:`ModelEvent` values::

    async with provider.stream(request) as events:
        async for event in events:
            ...

Guarantees every provider gives:

- ``stream()`` is an async context manager so that leaving the block, for any
  reason (end, error, *cancellation*), releases the upstream resources at once:
  for Bedrock that means the HTTP connection to the provider is closed, not
  left streaming into a buffer nobody reads.
- The events come in this order: exactly one :class:`Started` (before any
  text; it carries how many times the call was retried before it was
  accepted), any number of :class:`TextDelta`, then at most one
  :class:`Usage` and exactly one :class:`Stop` on a normal end.
- Failures are raised as one of the :class:`ProviderError` subclasses below,
  never as a library's own exception type. The translation happens inside the
  provider, at the boundary, and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True, slots=True)
class Pace:
    """A request's own timing for the simulated model (SPEC §8 ``X-Sim-*``)."""

    #: Tokens per second; 0 = as fast as the reader takes them. None: the setting.
    tokens_per_s: int | None = None
    #: Time to first token in milliseconds. None: the setting.
    ttft_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ModelRequest:
    model_id: str
    messages: tuple[ChatTurn, ...]
    max_tokens: int
    temperature: float | None = None
    system: str | None = None
    #: ``X-Test-Scenario`` value (SPEC §8), honoured by the simulated model only.
    scenario: str | None = None
    #: ``X-Sim-Tokens-Per-S`` / ``X-Sim-Ttft-Ms`` (SPEC §8), honoured by the simulated model only.
    pace: Pace | None = None


@dataclass(frozen=True, slots=True)
class Started:
    retries: int = 0


#: Not frozen (one per token: ``frozen=True`` costs ~320 ns a construction,
#: see :class:`observation.Event`); nothing sets a field after ``__init__``.
@dataclass(slots=True, unsafe_hash=True)
class TextDelta:
    text: str
    #: Another event follows at once (a run of tokens already due): the
    #: stream may wait for it before writing to its client (server.push).
    more: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Stop:
    #: ``stop`` (the model ended: Bedrock's end_turn / stop_sequence) or
    #: ``length`` (max_tokens reached).
    reason: Literal["stop", "length"]


ModelEvent = Started | TextDelta | Usage | Stop


class ProviderError(Exception):
    """An upstream failure, in the plain words a user is shown (SPEC §5.2).

    ``ProviderError`` ─┬─ ``Throttled``        (upstream 429)   RATE_LIMIT
                       ├─ ``UpstreamFailure``  (upstream 5xx, broken stream) UPSTREAM_ERROR
                       ├─ ``UpstreamTimeout``  (no answer in time) UPSTREAM_TIMEOUT
                       └─ ``InvalidRequest``   (upstream 4xx other than 429) UPSTREAM_INVALID
    """

    error_code = "UPSTREAM_ERROR"
    user_message = "Server error, please try again later."
    #: May a retry before the first token help?
    retryable = True

    def __init__(self, detail: str = "", *, retries: int = 0) -> None:
        super().__init__(detail or self.user_message)
        self.detail = detail
        self.retries = retries


class Throttled(ProviderError):
    error_code = "RATE_LIMIT"
    user_message = "Overloaded, please try again soon."


class UpstreamFailure(ProviderError):
    error_code = "UPSTREAM_ERROR"
    user_message = "Server error, please try again later."


class UpstreamTimeout(ProviderError):
    error_code = "UPSTREAM_TIMEOUT"
    user_message = "Request timed out. Please try again with a shorter message."


class InvalidRequest(ProviderError):
    error_code = "UPSTREAM_INVALID"
    user_message = "The model rejected the request."
    retryable = False


class Provider(Protocol):
    #: ``simulated`` or ``bedrock``; shown in ``/api/models``.
    name: str

    def stream(
        self, request: ModelRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]: ...


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with what no database column or UTF-8 byte can hold — NUL, and
    lone surrogates (a model's JSON may carry ``\\u0000`` or ``\\ud800``) —
    replaced by U+FFFD. The same string when there is none (the usual case)."""
    return _UNSTORABLE.sub("\ufffd", text)


def estimate_tokens(text: str) -> int:
    """A model-like token count for ``text`` (about four characters a token)."""
    return max(1, (len(text) + 3) // 4) if text else 0


def request_tokens(request: ModelRequest) -> int:
    """The input a request sends: its turns and its system text, estimated."""
    return sum(estimate_tokens(t.text) for t in request.messages) + estimate_tokens(
        request.system or ""
    )
