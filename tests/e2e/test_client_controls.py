"""Pacing headers and a real connection reset, for people testing their own
clients (SPEC §8), against a real server."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import with_settings
from tests.e2e.test_streaming import new_session
from tests.sse import Msg, events, messages


async def stream(live: Any, user: dict[str, Any], sid: str, **headers: str) -> list[Msg]:
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "pace me"},
        headers={**user["headers"], **headers},
    ) as r:
        assert r.status_code == 200
        out = []
        async for msg in messages(r):
            out.append(msg)
            if msg.event == "done":
                return out
    raise AssertionError("no done")


async def test_one_server_a_slow_stream_and_a_fast_one(live_factory, settings):
    # The server's own pace: 5 tokens/s, so 20 tokens take ~4 s.
    live = await live_factory(
        with_settings(settings, test_scenarios=True, sim_tokens_per_s=5, sse_heartbeat_ms=100)
    )
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    fast = await stream(live, alice, sid, **{"X-Sim-Tokens-Per-S": "0", "X-Sim-Ttft-Ms": "0"})
    chunks = [m for m in fast if m.event == "chunk"]
    assert len(chunks) == 20
    assert chunks[-1].at - fast[0].at < 2  # unpaced: well under the server's 4 s

    slow = await stream(live, alice, sid, **{"X-Sim-Tokens-Per-S": "20", "X-Sim-Ttft-Ms": "400"})
    chunks = [m for m in slow if m.event == "chunk"]
    first_byte = slow[0].at
    # The time to first token is this request's: heartbeats flow while it waits.
    assert chunks[0].at - first_byte >= 0.4
    assert any(
        m.comment and m.comment.startswith("heartbeat") for m in slow[: slow.index(chunks[0])]
    )
    # 20 tokens at 20/s: the schedule spans 19 intervals of 50 ms.
    assert chunks[-1].at - chunks[0].at >= 19 * 0.05 * 0.9


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Sim-Tokens-Per-S", "-1"),
        ("X-Sim-Tokens-Per-S", "100001"),
        ("X-Sim-Tokens-Per-S", "fast"),
        ("X-Sim-Tokens-Per-S", "1.5"),
        ("X-Sim-Ttft-Ms", "600001"),
        ("X-Sim-Ttft-Ms", ""),
        ("X-Sim-Ttft-Ms", "1e3"),
    ],
)
@pytest.mark.parametrize("on", [True, False])
async def test_pacing_out_of_range_is_400_whether_on_or_not(
    live_factory, settings, name, value, on
):
    live = await live_factory(with_settings(settings, test_scenarios=on))
    alice = live.harness.user(credits=1000)
    sid = await new_session(live, alice)
    for url in (f"/api/chat/sessions/{sid}/stream", "/api/v1/chat"):
        r = await live.http.post(
            url, json={"message": "hi"}, headers={**alice["headers"], name: value}
        )
        assert r.status_code == 400, url
        assert r.json()["errorCode"] == "VALIDATION_ERROR"
        assert r.json()["details"] == [{"field": name}]
    assert live.harness.svc.ledger.balance(alice["id"]).available == 1000


async def test_pacing_is_ignored_when_scenarios_are_off(live):
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    # One token a minute would take 20 minutes if it were honoured.
    got = await stream(live, alice, sid, **{"X-Sim-Tokens-Per-S": "1", "X-Sim-Ttft-Ms": "600000"})
    assert events(got)[-1].data["finishReason"] == "stop"


async def read_until_cut(live: Any, user: dict[str, Any], sid: str) -> tuple[str, bytes]:
    """A reset_midway stream read to its end, which must be a cut: (stream id, bytes)."""
    raw, stream_id = b"", ""
    try:
        async with live.http.stream(
            "POST",
            f"/api/chat/sessions/{sid}/stream",
            json={"message": "cut me"},
            headers={**user["headers"], "X-Test-Scenario": "reset_midway"},
        ) as r:
            stream_id = r.headers["x-streaming-session-id"]
            async for chunk in r.aiter_raw():
                raw += chunk
    except httpx.RemoteProtocolError:  # no terminating chunk: a real cut
        return stream_id, raw
    raise AssertionError("the stream ended cleanly; a reset was expected")


async def test_reset_midway_cuts_without_done_then_resume_picks_it_up(live_factory, settings):
    live = await live_factory(
        with_settings(
            settings,
            test_scenarios=True,
            sim_tokens_per_s=100,
            sim_answer_tokens=40,
            disconnect_grace_ms=10_000,
        )
    )
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    stream_id, raw = await read_until_cut(live, alice, sid)
    blocks = [b for b in raw.decode().split("\n\n") if b.startswith("id: ")]
    assert [int(b.split("\n")[0][4:]) for b in blocks] == list(range(1, 21))  # half of 40
    assert b"event: done" not in raw
    # The stream carries on within the grace (it may even have ended by now: the
    # resume below replays the rest, and the stored message is complete).
    run = live.harness.svc.hub.for_stream(stream_id)

    async with live.http.stream(
        "GET",
        f"/api/chat/sessions/{sid}/stream",
        params={"streamingSessionId": stream_id},
        headers={**alice["headers"], "Last-Event-ID": "20"},
    ) as resumed:
        rest = events([m async for m in messages(resumed)])
    assert [e.id for e in rest] == list(range(21, 42))
    assert rest[-1].event == "done" and rest[-1].data["finishReason"] == "stop"
    if run is not None:
        with trio.fail_after(5):
            await run.wait_done()
    stored = live.harness.svc.store.message_by_stream(stream_id)
    assert stored["status"] == "complete" and stored["output_tokens"] == 40


async def test_reset_midway_with_no_grace_is_a_disconnect(live_factory, settings, caplog):
    live = await live_factory(
        with_settings(settings, test_scenarios=True, sim_tokens_per_s=50, sim_answer_tokens=40)
    )
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    stream_id, _ = await read_until_cut(live, alice, sid)
    run = live.harness.svc.hub.for_stream(stream_id)
    if run is not None:
        with trio.fail_after(5):
            await run.wait_done()
    stored = live.harness.svc.store.message_by_stream(stream_id)
    assert stored["status"] == "interrupted" and stored["finish_reason"] == "client_disconnected"
    assert 20 <= stored["output_tokens"] < 40
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0
    # A deliberate reset is not a server error: nothing logged as one.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
