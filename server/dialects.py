"""How a stream's events are spelled on the wire: one dialect per client protocol.

A run publishes into its observation ring through its dialect, so every
reader of the ring — the client, a resumed client, each observer — gets the
very bytes the client got, in the client's own protocol:

- :data:`CHAT` (SPEC §5): ``: connected``, ``chunk`` ``{"text"}``…, then
  ``error`` ``{message, errorCode}`` on a failure, and ``done`` with the
  settled numbers.
- :data:`V1` (SPEC §8, the "AI Chat API" of seed 002):
  ``: Connected to chat stream``, ``token`` ``{"text"}``…, ``usage``
  ``{tokens_in, tokens_out, cost_usd, model}`` and ``done``
  ``{finish_reason}``. A failure is one friendly ``token`` then ``done``
  ``{"finish_reason":"error"}`` (no ``usage``), exactly as seed 002 shows;
  any other early end (stopped by a supervisor, server shutdown) says why
  in one ``token``, then ``usage`` for what was produced, then ``done``.

Both give every event an ``id:`` (the ring's sequence number), so both can
be resumed with ``Last-Event-ID``. Chunk data is built per token, so it is
spelled by hand rather than through ``json.dumps`` of a dict.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol

from .providers.base import ProviderError

__all__ = ["CHAT", "DIALECTS", "V1", "Dialect", "Ending"]


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: Anything JSON would escape in a string.
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\u2028\u2029\ud800-\udfff]')


def _text(text: str) -> str:
    """``{"text": text}`` as compact JSON; a plain token skips the encoder."""
    if _NEEDS_ESCAPE.search(text) is None:
        return '{"text":"' + text + '"}'
    return '{"text":' + json.dumps(text, ensure_ascii=False) + "}"


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ended, once its message and its charge are committed."""

    stream_id: str
    message_id: str
    model_id: str
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: float
    finish_reason: str
    error: ProviderError | None


class Dialect(Protocol):
    #: How the cluster names it (a mirror on another node speaks it too).
    name: str
    #: Every event name this dialect may publish (the README documents each).
    events: tuple[str, ...]
    #: The comment flushed with the headers, before any upstream call.
    connected: bytes

    def chunk(self, text: str) -> tuple[str, str]: ...

    def ending(self, end: Ending) -> list[tuple[str, str]]: ...


class _Chat:
    name = "chat"
    events: tuple[str, ...] = ("chunk", "error", "done")
    connected = b": connected\n\n"

    def chunk(self, text: str) -> tuple[str, str]:
        if _NEEDS_ESCAPE.search(text) is None:  # _text's plain case, inline: per token
            return "chunk", '{"text":"' + text + '"}'
        return "chunk", _text(text)

    def ending(self, end: Ending) -> list[tuple[str, str]]:
        out = []
        if end.error is not None:
            out.append(
                (
                    "error",
                    _dumps({"message": end.error.user_message, "errorCode": end.error.error_code}),
                )
            )
        out.append(
            (
                "done",
                _dumps(
                    {
                        "streamingSessionId": end.stream_id,
                        "messageId": end.message_id,
                        "tokensUsed": end.input_tokens + end.output_tokens,
                        "inputTokens": end.input_tokens,
                        "outputTokens": end.output_tokens,
                        "creditsCharged": end.credits_charged,
                        "finishReason": end.finish_reason,
                    }
                ),
            )
        )
        return out


class _V1:
    name = "v1"
    events: tuple[str, ...] = ("token", "usage", "done")
    connected = b": Connected to chat stream\n\n"

    def chunk(self, text: str) -> tuple[str, str]:
        if _NEEDS_ESCAPE.search(text) is None:  # _text's plain case, inline: per token
            return "token", '{"text":"' + text + '"}'
        return "token", _text(text)

    def ending(self, end: Ending) -> list[tuple[str, str]]:
        out = []
        if end.error is not None:
            out.append(("token", _text(end.error.user_message)))
        if end.finish_reason != "error":
            usage = {
                "tokens_in": end.input_tokens,
                "tokens_out": end.output_tokens,
                "cost_usd": end.cost_usd,
                "model": end.model_id,
            }
            out.append(("usage", _dumps(usage)))
        out.append(("done", _dumps({"finish_reason": end.finish_reason})))
        return out


CHAT: Dialect = _Chat()
V1: Dialect = _V1()
#: Each dialect by its name.
DIALECTS: dict[str, Dialect] = {d.name: d for d in (CHAT, V1)}
