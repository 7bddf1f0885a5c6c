"""The Bedrock path end to end: chinwag (CHINWAG_PROVIDER=bedrock) → the real
aiobotocore client → `fake-bedrock`, all over loopback sockets."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from server.providers.fake_bedrock import FakeBedrock, FakeSettings
from server.telemetry import telemetry_rows
from tests.conftest import with_settings
from tests.e2e.test_streaming import FAULT_WORDS, new_session
from tests.sse import collect, events, messages, text_of

pytestmark = pytest.mark.usefixtures("aws_env", "fast_backoff")


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeBedrock:
    fb = FakeBedrock(FakeSettings(ttft_ms=0, tokens_per_s=0, answer_tokens=30))
    await nursery.start(fb.serve)
    return fb


@pytest.fixture
async def blive(live_factory: Any, settings: Any, fake: FakeBedrock) -> Any:
    return await live_factory(
        with_settings(
            settings,
            provider="bedrock",
            bedrock_endpoint_url=fake.url,
            bedrock_read_timeout_ms=500,
            upstream_max_attempts=3,
        )
    )


async def _stream(live: Any, user: dict, sid: str, **body: Any) -> tuple[str, list]:
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "Hello Bedrock", **body},
        headers=user["headers"],
    ) as r:
        assert r.status_code == 200
        return r.headers["x-streaming-session-id"], await collect(r)


async def test_stream_through_bedrock(blive, fake):
    alice = blive.harness.user(credits=10_000)
    sid = await new_session(blive, alice)
    stream_id, msgs = await _stream(blive, alice, sid)
    evs = events(msgs)
    assert [e.event for e in evs] == ["chunk"] * 30 + ["done"]
    done = evs[-1].data
    assert done["finishReason"] == "stop" and done["outputTokens"] == 30
    assert done["inputTokens"] > 0 and done["tokensUsed"] == done["inputTokens"] + 30
    stored = blive.harness.svc.store.message_by_stream(stream_id)
    assert stored["content"] == text_of(msgs) and stored["status"] == "complete"
    # maxTokens reaches Bedrock and ends as "length".
    _, msgs = await _stream(blive, alice, sid, maxTokens=7)
    assert events(msgs)[-1].data["finishReason"] == "length"
    assert len([e for e in events(msgs) if e.event == "chunk"]) == 7


async def test_client_disconnect_closes_the_upstream_connection(blive, fake):
    fake.settings.tokens_per_s = 20
    fake.settings.answer_tokens = 400
    alice = blive.harness.user(credits=100_000)
    sid = await new_session(blive, alice)
    async with blive.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "a long one"},
        headers=alice["headers"],
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        run = blive.harness.svc.hub.for_stream(stream_id)
        feed = messages(r)
        chunks = 0
        while chunks < 3:
            chunks += (await feed.__anext__()).event == "chunk"
        upstream = [c for c in fake.connections if c.closed_at is None and c.model_id]
        assert len(upstream) == 1
        closed_at_client = trio.current_time()
    # The client's connection is closed now; the upstream one must follow at once.
    with trio.fail_after(1):
        record = await fake.wait_closed(upstream[0].id)
    latency = record.closed_at - closed_at_client
    assert 0 <= latency < 1.0
    with trio.fail_after(2):
        await run.wait_done()
    stored = blive.harness.svc.store.message_by_stream(stream_id)
    assert stored["status"] == "interrupted"
    assert 3 <= stored["output_tokens"] < 400
    bal = blive.harness.svc.ledger.balance(alice["id"])
    assert bal.reserved == 0 and bal.balance == 100_000 - stored["credits_charged"]
    assert 0 < stored["credits_charged"] < run.reservation.amount


async def test_throttled_twice_then_served_counts_retries(blive, fake):
    alice = blive.harness.user(credits=10_000)
    sid = await new_session(blive, alice)
    fake.push_fault("throttle", 2)
    stream_id, msgs = await _stream(blive, alice, sid)
    assert events(msgs)[-1].data["finishReason"] == "stop"
    assert [q.status for q in fake.requests] == [429, 429, 200]
    [row] = telemetry_rows(blive.harness.svc.store, limit=1)
    assert row["payload"]["provider_retry_count"] == 2
    assert row["payload"]["streamingSessionId"] == stream_id


@pytest.mark.parametrize(
    ("fault", "scenario"),
    [
        ("throttle", "rate_limit"),
        ("server_error", "server_error"),
        ("break_midway", "drop_midway"),
        ("hang", "timeout"),
    ],
)
async def test_upstream_faults_become_plain_error_events(blive, fake, fault, scenario):
    alice = blive.harness.user(credits=10_000)
    sid = await new_session(blive, alice)
    fake.push_fault(fault, None)
    _, msgs = await _stream(blive, alice, sid)
    evs = events(msgs)
    message, code = FAULT_WORDS[scenario]
    assert evs[-2].event == "error" and evs[-2].data == {"message": message, "errorCode": code}
    assert evs[-1].event == "done" and evs[-1].data["finishReason"] == "error"
    assert blive.harness.svc.ledger.balance(alice["id"]).reserved == 0
    assert blive.harness.svc.ledger.verify() == []
