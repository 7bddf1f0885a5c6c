"""The ledger under load and after a crash, through the real server."""

from __future__ import annotations

import signal

import httpx
import trio

from tests.conftest import with_settings
from tests.e2e.test_cli import _run, start_server
from tests.sse import messages

N_REQUESTS = 200
PER_STREAM = 5  # nova-micro, maxTokens 1000: ceil((input + 1000 * 4) / 1000) = 5
BALANCE = 250


async def test_hundreds_of_concurrent_reservations_never_overdraw(live_factory, settings):
    live = await live_factory(
        with_settings(settings, sim_ttft_ms=60_000, max_streams_per_user=10_000)
    )
    alice = live.harness.user(credits=BALANCE)
    sessions = []
    for _ in range(N_REQUESTS):
        r = await live.http.post("/api/chat/sessions", json={}, headers=alice["headers"])
        sessions.append(r.json()["sessionId"])

    outcomes: list[int] = []
    all_sent, all_answered = trio.Event(), trio.Event()
    limits = httpx.Limits(max_connections=N_REQUESTS + 10)
    async with httpx.AsyncClient(base_url=live.url, timeout=30, limits=limits) as http:

        async def one(sid: str) -> None:
            async with http.stream(
                "POST",
                f"/api/chat/sessions/{sid}/stream",
                json={"message": "hi", "maxTokens": 1000},
                headers=alice["headers"],
            ) as r:
                outcomes.append(r.status_code)
                if len(outcomes) == N_REQUESTS:
                    all_answered.set()
                if r.status_code == 200:
                    feed = messages(r)  # keep a reference: dropping it closes the response
                    await feed.__anext__()  # ": connected": the reservation is held
                    await all_sent.wait()  # hold it until every request has an answer
                else:
                    await r.aread()

        async with trio.open_nursery() as nursery:
            for sid in sessions:
                nursery.start_soon(one, sid)
            with trio.fail_after(30):
                await all_answered.wait()
            ok = outcomes.count(200)
            bal = live.harness.svc.ledger.balance(alice["id"])
            assert ok == BALANCE // PER_STREAM
            assert outcomes.count(402) == N_REQUESTS - ok
            assert bal.reserved == ok * PER_STREAM and bal.available == 0
            all_sent.set()

    # Every client has gone: every run ends, nothing produced, nothing charged.
    for run in list(live.harness.svc.hub.live()):
        with trio.fail_after(5):
            await run.wait_done()
    bal = live.harness.svc.ledger.balance(alice["id"])
    assert (bal.balance, bal.reserved, bal.available) == (BALANCE, 0, BALANCE)
    assert live.harness.svc.ledger.verify() == []


async def test_kill_9_mid_stream_then_restart_recovers(tmp_path, nursery):
    assert _run(tmp_path, "user", "add", "cy", "--password", "cy-password-1").returncode == 0
    assert _run(tmp_path, "credits", "allocate", "cy", "500").returncode == 0
    token = _run(tmp_path, "token", "cy").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}

    server = await start_server(tmp_path, nursery, CHINWAG_SIM_TTFT_MS="60000")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        sid = (await http.post("/api/chat/sessions", json={}, headers=headers)).json()["sessionId"]
        async with http.stream(
            "POST",
            f"/api/chat/sessions/{sid}/stream",
            json={"message": "never finished"},
            headers=headers,
        ) as r:
            feed = messages(r)  # keep a reference: dropping it closes the response
            await feed.__anext__()
            before = (await http.get("/api/credits/balance", headers=headers)).json()
            assert before["reserved"] > 0
            server.proc.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await server.proc.wait()

    server = await start_server(
        tmp_path, nursery, CHINWAG_SIM_TTFT_MS="0", CHINWAG_SIM_TOKENS_PER_S="0"
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            bal = (await http.get("/api/credits/balance", headers=headers)).json()
            assert bal == {"userId": bal["userId"], "balance": 500, "reserved": 0, "available": 500}
            msgs = (await http.get(f"/api/chat/sessions/{sid}/messages", headers=headers)).json()
            assert [(m["role"], m["status"]) for m in msgs["messages"]] == [
                ("user", "complete"),
                ("assistant", "interrupted"),
            ]
            # ... and it serves normally.
            r = await http.post(
                f"/api/chat/sessions/{sid}/messages", json={"message": "again"}, headers=headers
            )
            assert r.status_code == 200
            assert r.json()["assistantMessage"]["status"] == "complete"
    finally:
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await server.proc.wait() == 0
