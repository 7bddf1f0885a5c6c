"""Streaming over a real Hypercorn server and a real HTTP client (SPEC §5)."""

from __future__ import annotations

import itertools
import time

import httpx
import pytest
import trio

from tests.conftest import with_settings
from tests.sse import collect, events, messages, text_of

FAULT_WORDS = {
    "rate_limit": ("Overloaded, please try again soon.", "RATE_LIMIT"),
    "server_error": ("Server error, please try again later.", "UPSTREAM_ERROR"),
    "timeout": ("Request timed out. Please try again with a shorter message.", "UPSTREAM_TIMEOUT"),
    "drop_midway": ("Server error, please try again later.", "UPSTREAM_ERROR"),
}


async def new_session(live, user) -> str:
    r = await live.http.post("/api/chat/sessions", json={"title": "t"}, headers=user["headers"])
    assert r.status_code == 201
    return r.json()["sessionId"]


async def test_stream_end_to_end_then_update_stream(live):
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    url = f"/api/chat/sessions/{sid}/stream"
    async with live.http.stream(
        "POST",
        url,
        json={"message": "Tell me about trio"},
        headers={**alice["headers"], "X-Request-Id": "rid-1"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache, no-store, must-revalidate"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-request-id"] == "rid-1"
        stream_id = r.headers["x-streaming-session-id"]
        assert stream_id.startswith("stream-")
        msgs = await collect(r)
    assert msgs[0].comment == "connected"
    evs = events(msgs)
    assert [e.id for e in evs] == list(range(1, len(evs) + 1))
    assert [e.event for e in evs] == ["chunk"] * 20 + ["done"]
    done = evs[-1].data
    assert done["streamingSessionId"] == stream_id
    assert done["finishReason"] == "stop"
    assert done["outputTokens"] == 20
    assert done["tokensUsed"] == done["inputTokens"] + done["outputTokens"]
    text = text_of(msgs)

    # update-stream at once after done never races the server.
    r = await live.http.post(
        f"/api/chat/sessions/{sid}/update-stream",
        json={"streamingSessionId": stream_id, "completeResponse": "forged"},
        headers=alice["headers"],
    )
    assert r.status_code == 200
    message = r.json()["message"]
    assert message["content"] == text  # the server's record wins over completeResponse
    assert message["id"] == done["messageId"] and message["status"] == "complete"
    assert message["tokensUsed"] == done["tokensUsed"]
    again = await live.http.post(
        f"/api/chat/sessions/{sid}/update-stream",
        json={"streamingSessionId": stream_id},
        headers=alice["headers"],
    )
    assert again.json() == r.json()  # idempotent

    bal = live.harness.svc.ledger.balance(alice["id"])
    assert bal.balance == 10_000 - done["creditsCharged"] and bal.reserved == 0

    # A second stream, then the seed's wrong-id check.
    async with live.http.stream(
        "POST", url, json={"message": "again"}, headers=alice["headers"]
    ) as r:
        second = r.headers["x-streaming-session-id"]
        await collect(r)
    assert second != stream_id
    for wrong in ["stream-0-nope", "", None, 5]:
        r = await live.http.post(
            f"/api/chat/sessions/{sid}/update-stream",
            json={"streamingSessionId": wrong},
            headers=alice["headers"],
        )
        assert r.status_code == 400
        assert r.json() == {
            "message": "Streaming session ID mismatch",
            "errorCode": "STREAMING_SESSION_MISMATCH",
        }


async def test_update_stream_for_another_session_is_a_mismatch(live):
    alice = live.harness.user(credits=10_000)
    s1, s2 = await new_session(live, alice), await new_session(live, alice)
    async with live.http.stream(
        "POST", f"/api/chat/sessions/{s1}/stream", json={"message": "hi"}, headers=alice["headers"]
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        await collect(r)
    r = await live.http.post(
        f"/api/chat/sessions/{s2}/update-stream",
        json={"streamingSessionId": stream_id},
        headers=alice["headers"],
    )
    assert r.status_code == 400 and r.json()["errorCode"] == "STREAMING_SESSION_MISMATCH"


async def test_headers_and_first_comment_flush_before_the_first_token(live_factory, settings):
    live = await live_factory(with_settings(settings, sim_ttft_ms=60_000))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "slow start"},
        headers=alice["headers"],
    ) as r:
        assert r.status_code == 200
        stream_id = r.headers["x-streaming-session-id"]
        feed = messages(r)  # keep a reference: dropping it closes the response
        first = await feed.__anext__()
        assert first.comment == "connected"
        # While we hold the first comment, the model has not produced anything.
        run = live.harness.svc.hub.for_stream(stream_id)
        assert run is not None and not run.done
        # update-stream while running → 409
        r2 = await live.http.post(
            f"/api/chat/sessions/{sid}/update-stream",
            json={"streamingSessionId": stream_id},
            headers=alice["headers"],
        )
        assert r2.status_code == 409 and r2.json()["errorCode"] == "STREAM_IN_PROGRESS"


async def test_an_unpaced_answer_many_rings_long_reaches_its_client_whole(live_factory, settings):
    """Unpaced, the model hands over runs of 32 due tokens; the run writes each
    run in one go (server.push). With a 16-event ring a run does not fit: the
    run has its client's response write what it held back, then goes on."""
    live = await live_factory(with_settings(settings, observe_ring=16, sim_answer_tokens=600))
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "a long one", "maxTokens": 600},
        headers=alice["headers"],
    ) as r:
        with trio.fail_after(10):
            got = [m async for m in messages(r) if not m.comment]
    ids = [m.id for m in got]
    assert ids == list(range(1, len(got) + 1))  # in order, no gap, no duplicate
    assert [m.event for m in got].count("chunk") == 600 and got[-1].event == "done"
    assert got[-1].data["finishReason"] == "stop"


async def test_heartbeats_at_the_configured_interval_while_waiting(live_factory, settings):
    live = await live_factory(with_settings(settings, sim_ttft_ms=60_000, sse_heartbeat_ms=100))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    beats: list[tuple[float, int]] = []
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "wait for it"},
        headers=alice["headers"],
    ) as r:
        opened = trio.current_time()
        async for msg in messages(r):
            if msg.comment and msg.comment.startswith("heartbeat "):
                beats.append((msg.at, int(msg.comment.split()[1])))
                if len(beats) == 4:
                    break
    # The configured 100 ms, not the default 15 s: beat k is due k periods after the
    # opening, never early; a stalled loop may send one late (the next is on schedule
    # again, so one gap alone may be short, or 0 when both arrive in one read).
    at = [opened] + [b[0] for b in beats]
    assert 0.05 < (at[-1] - opened) / len(beats) < 0.5, [t - opened for t in at]
    assert max(b - a for a, b in itertools.pairwise(at)) < 1.0
    assert all(abs(ms / 1000 - time.time()) < 60 for _, ms in beats)  # epoch milliseconds


async def test_client_disconnect_aborts_and_charges_only_produced_tokens(live_factory, settings):
    live = await live_factory(with_settings(settings, sim_tokens_per_s=100, sim_answer_tokens=500))
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "a long answer please", "maxTokens": 1000},
        headers=alice["headers"],
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        run = live.harness.svc.hub.for_stream(stream_id)
        got = 0
        async for msg in messages(r):
            got += msg.event == "chunk"
            if got == 3:
                break
        # Leaving the block closes the connection for real.
    with trio.fail_after(2):
        await run.wait_done()
    msg = live.harness.svc.store.message_by_stream(stream_id)
    assert msg["status"] == "interrupted"
    assert msg["finish_reason"] == "client_disconnected"
    assert 3 <= msg["output_tokens"] < 500
    assert len(msg["content"].split()) == msg["output_tokens"]
    bal = live.harness.svc.ledger.balance(alice["id"])
    assert bal.reserved == 0
    assert bal.balance == 100_000 - msg["credits_charged"]
    assert 0 < msg["credits_charged"] < run.reservation.amount
    assert live.harness.svc.ledger.verify() == []


async def test_second_concurrent_stream_on_a_session_is_409(live_factory, settings):
    live = await live_factory(with_settings(settings, sim_ttft_ms=60_000))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "one"},
        headers=alice["headers"],
    ) as r:
        feed = messages(r)  # keep a reference: dropping it closes the response
        await feed.__anext__()
        r2 = await live.http.post(
            f"/api/chat/sessions/{sid}/stream", json={"message": "two"}, headers=alice["headers"]
        )
        assert r2.status_code == 409 and r2.json()["errorCode"] == "STREAM_ALREADY_ACTIVE"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"message": ""}, "VALIDATION_ERROR"),
        ({"message": "   "}, "VALIDATION_ERROR"),
        ({"message": "x" * 4001}, "VALIDATION_ERROR"),
        ({"message": "hi", "modelId": "nope"}, "MODEL_NOT_FOUND"),
        ({"message": "hi", "maxTokens": 0}, "VALIDATION_ERROR"),
        ({"message": "hi", "maxTokens": 10**6}, "VALIDATION_ERROR"),
        ({"message": "hi", "temperature": 7}, "VALIDATION_ERROR"),
        ({"message": "hi", "temperature": "hot"}, "VALIDATION_ERROR"),
    ],
)
async def test_bad_stream_requests_are_plain_400s(live, body, code):
    alice = live.harness.user(credits=1000)
    sid = await new_session(live, alice)
    r = await live.http.post(
        f"/api/chat/sessions/{sid}/stream", json=body, headers=alice["headers"]
    )
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["errorCode"] == code
    assert live.harness.svc.ledger.balance(alice["id"]).available == 1000
    assert live.harness.svc.store.list_messages(sid)[1] == 0


async def test_stream_without_credits_is_402_json(live):
    alice = live.harness.user(credits=0)
    sid = await new_session(live, alice)
    r = await live.http.post(
        f"/api/chat/sessions/{sid}/stream", json={"message": "hi"}, headers=alice["headers"]
    )
    assert r.status_code == 402 and r.json()["errorCode"] == "INSUFFICIENT_CREDITS"
    assert live.harness.svc.store.list_messages(sid)[1] == 0


async def test_malformed_json_stream_body(live):
    alice = live.harness.user(credits=1000)
    sid = await new_session(live, alice)
    r = await live.http.post(
        f"/api/chat/sessions/{sid}/stream",
        content=b"{nope",
        headers={**alice["headers"], "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["errorCode"] == "VALIDATION_ERROR"


@pytest.mark.parametrize("scenario", sorted(FAULT_WORDS))
async def test_fault_scenarios_end_in_error_then_done(live_factory, settings, scenario):
    live = await live_factory(with_settings(settings, test_scenarios=True, sim_answer_tokens=10))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "break please"},
        headers={**alice["headers"], "X-Test-Scenario": scenario},
    ) as r:
        assert r.status_code == 200
        evs = events(await collect(r))
    message, code = FAULT_WORDS[scenario]
    assert evs[-2].event == "error" and evs[-2].data == {"message": message, "errorCode": code}
    assert evs[-1].event == "done" and evs[-1].data["finishReason"] == "error"
    chunks = [e for e in evs if e.event == "chunk"]
    assert (len(chunks) > 0) == (scenario == "drop_midway")
    assert evs[-1].data["outputTokens"] == len(chunks)
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0


async def test_scenarios_are_ignored_when_off(live):
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "x"},
        headers={**alice["headers"], "X-Test-Scenario": "server_error"},
    ) as r:
        evs = events(await collect(r))
    assert evs[-1].data["finishReason"] == "stop"
    # An unknown one too (SPEC §8: "ignored when off"); X-Sim-* are checked all the same.
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "x"},
        headers={**alice["headers"], "X-Test-Scenario": "SERVER_ERROR"},
    ) as r:
        assert r.status_code == 200
        evs = events(await collect(r))
    assert evs[-1].data["finishReason"] == "stop"
    r = await live.http.post(
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "x"},
        headers={**alice["headers"], "X-Sim-Tokens-Per-S": "fast"},
    )
    assert r.status_code == 400 and r.json()["errorCode"] == "VALIDATION_ERROR"


async def test_an_unknown_scenario_is_refused_when_scenarios_are_on(live_factory, settings):
    live = await live_factory(with_settings(settings, test_scenarios=True))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    r = await live.http.post(
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "x"},
        headers={**alice["headers"], "X-Test-Scenario": "SERVER_ERROR"},
    )
    assert r.status_code == 400 and r.json()["errorCode"] == "VALIDATION_ERROR"
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0


async def test_hang_scenario_keeps_heartbeating_until_the_client_leaves(live_factory, settings):
    live = await live_factory(with_settings(settings, test_scenarios=True, sse_heartbeat_ms=50))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "hang"},
        headers={**alice["headers"], "X-Test-Scenario": "hang"},
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        run = live.harness.svc.hub.for_stream(stream_id)
        beats = 0
        async for msg in messages(r):
            assert msg.event is None
            beats += bool(msg.comment and msg.comment.startswith("heartbeat"))
            if beats == 3:
                break
    with trio.fail_after(2):
        await run.wait_done()
    msg = live.harness.svc.store.message_by_stream(stream_id)
    assert msg["status"] == "interrupted" and msg["credits_charged"] == 0
    assert live.harness.svc.ledger.balance(alice["id"]).balance == 10_000


async def test_a_failing_settlement_ends_one_stream_not_the_server(live, monkeypatch):
    alice = live.harness.user(credits=10_000)
    sid1, sid2 = await new_session(live, alice), await new_session(live, alice)
    book = live.harness.svc.ledger
    writer = live.harness.svc.db.write_ledger  # settlements run on the database writer
    real_settlement = writer.settlement

    def broken_settlement(*args, **kwargs):
        def unit(conn):
            raise RuntimeError("disk on fire")

        return unit

    monkeypatch.setattr(writer, "settlement", broken_settlement)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid1}/stream",
        json={"message": "one"},
        headers=alice["headers"],
    ) as r:
        evs = events(await collect(r))
    # Told, not left hanging: not saved, not charged.
    assert [e.event for e in evs[-2:]] == ["error", "done"]
    assert evs[-2].data["errorCode"] == "INTERNAL_ERROR"
    assert evs[-1].data["finishReason"] == "error" and evs[-1].data["creditsCharged"] == 0
    broken_stream = evs[-1].data["streamingSessionId"]
    monkeypatch.setattr(writer, "settlement", real_settlement)
    # The hub (and the server) still serve.
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid2}/stream",
        json={"message": "two"},
        headers=alice["headers"],
    ) as r:
        evs = events(await collect(r))
    assert evs[-1].data["finishReason"] == "stop"
    charged_two = evs[-1].data["creditsCharged"]
    # Nothing of the broken one's ending was written; the hub ended it without
    # its run once the database answered (server.abandoned): its reservation
    # released, its message interrupted, nothing charged, as its client was told.
    with trio.fail_after(10):
        await live.harness.svc.hub.abandoned.drained()
    assert book.open_reservations(alice["id"]) == []
    assert book.recover() == 0 and book.verify() == []
    assert live.harness.svc.store.recover_streaming() == 0
    broken = live.harness.svc.store.message_by_stream(broken_stream)
    assert broken["status"] == "interrupted" and broken["credits_charged"] == 0
    balance = book.balance(alice["id"])
    assert (balance.balance, balance.reserved) == (10_000 - charged_two, 0)


async def test_stream_caps_per_user_and_per_process(live_factory, settings):
    live = await live_factory(
        with_settings(settings, sim_ttft_ms=60_000, max_streams_per_user=2, max_streams=3)
    )
    alice, bob = live.harness.user(credits=10_000), live.harness.user(credits=10_000)
    sessions = {u["id"]: [await new_session(live, u) for _ in range(3)] for u in (alice, bob)}
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=live.url, timeout=10, limits=limits) as http:
        held = []

        async def open_stream(user: dict, sid: str) -> int:
            cm = http.stream(
                "POST",
                f"/api/chat/sessions/{sid}/stream",
                json={"message": "hold"},
                headers=user["headers"],
            )
            r = await cm.__aenter__()
            if r.status_code == 200:
                feed = messages(r)
                await feed.__anext__()
                held.append((cm, feed))
            else:
                await r.aread()
                await cm.__aexit__(None, None, None)
            return r.status_code, (r.json() if r.status_code != 200 else None), r.headers

        try:
            assert (await open_stream(alice, sessions[alice["id"]][0]))[0] == 200
            assert (await open_stream(alice, sessions[alice["id"]][1]))[0] == 200
            status, body, _ = await open_stream(alice, sessions[alice["id"]][2])
            assert status == 429 and body["errorCode"] == "TOO_MANY_STREAMS"
            assert (await open_stream(bob, sessions[bob["id"]][0]))[0] == 200
            status, body, headers = await open_stream(bob, sessions[bob["id"]][1])
            assert status == 503 and body["errorCode"] == "SERVER_BUSY"
            assert int(headers["retry-after"]) >= 1
            # Refused requests reserved nothing.
            assert live.harness.svc.ledger.balance(alice["id"]).reserved == 2 * 5
        finally:
            for cm, _feed in held:
                await cm.__aexit__(None, None, None)


async def test_a_whole_answer_takes_the_same_test_controls(live_factory, settings):
    """POST …/messages reads X-Test-Scenario and X-Sim-* as the stream does, and an
    upstream failure is 503 UPSTREAM_UNAVAILABLE (SPEC §2) naming the upstream's code."""
    live = await live_factory(with_settings(settings, test_scenarios=True))
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    url = f"/api/chat/sessions/{sid}/messages"
    r = await live.http.post(
        url, json={"message": "x"}, headers={**alice["headers"], "X-Test-Scenario": "rate_limit"}
    )
    assert r.status_code == 503 and r.headers["Retry-After"]
    body = r.json()
    assert body["errorCode"] == "UPSTREAM_UNAVAILABLE"
    assert body["details"] == [{"upstreamErrorCode": "RATE_LIMIT"}]
    balance = live.harness.svc.ledger.balance(alice["id"])
    assert (balance.balance, balance.reserved) == (10_000, 0)
    r = await live.http.post(
        url, json={"message": "x"}, headers={**alice["headers"], "X-Sim-Tokens-Per-S": "abc"}
    )
    assert r.status_code == 400 and r.json()["errorCode"] == "VALIDATION_ERROR"
    r = await live.http.post(url, json={"message": "x"}, headers=alice["headers"])
    assert r.status_code == 200 and r.json()["creditsCharged"] > 0
