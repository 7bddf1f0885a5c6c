"""The wire spelling of each dialect (server/dialects.py)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from server.dialects import CHAT, V1, Ending
from server.streams import StreamCancelled

# Any text a model could send: every code point but lone surrogates.
TEXT = st.text(st.characters(exclude_categories=("Cs",)))


@given(TEXT)
def test_chunk_data_is_the_json_of_the_text(text: str) -> None:
    for dialect, name in ((CHAT, "chunk"), (V1, "token")):
        event, data = dialect.chunk(text)
        assert event == name
        assert json.loads(data) == {"text": text}
        assert data == json.dumps({"text": text}, separators=(",", ":"), ensure_ascii=False)


def ending(finish: str, error: object = None) -> Ending:
    return Ending("stream-1", "m1", "model", 12, 30, 3, 0.00003, finish, error)  # type: ignore[arg-type]


def test_chat_ending_is_error_then_done() -> None:
    names = [name for name, _ in CHAT.ending(ending("cancelled", StreamCancelled()))]
    assert names == ["error", "done"]
    done = json.loads(CHAT.ending(ending("stop"))[-1][1])
    assert done == {
        "streamingSessionId": "stream-1",
        "messageId": "m1",
        "tokensUsed": 42,
        "inputTokens": 12,
        "outputTokens": 30,
        "creditsCharged": 3,
        "finishReason": "stop",
    }


def test_v1_ending_is_seed_002s() -> None:
    ok = V1.ending(ending("stop"))
    assert [n for n, _ in ok] == ["usage", "done"]
    assert json.loads(ok[0][1]) == {
        "tokens_in": 12,
        "tokens_out": 30,
        "cost_usd": 0.00003,
        "model": "model",
    }
    from server.providers.base import UpstreamTimeout

    failed = V1.ending(ending("error", UpstreamTimeout()))
    assert failed == [
        ("token", '{"text":"Request timed out. Please try again with a shorter message."}'),
        ("done", '{"finish_reason":"error"}'),
    ]
    stopped = [n for n, _ in V1.ending(ending("cancelled", StreamCancelled()))]
    assert stopped == ["token", "usage", "done"]
