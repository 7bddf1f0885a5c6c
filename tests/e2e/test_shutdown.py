"""SIGTERM with open streams: every client and observer is told, everything is
persisted and settled, and the process exits 0 within the bound."""

from __future__ import annotations

import signal

import httpx
import trio

from tests.e2e.test_cli import _run, start_server
from tests.sse import events, messages


async def test_sigterm_tells_streams_and_observers_then_exits_0(tmp_path, nursery):
    assert _run(tmp_path, "user", "add", "dee", "--password", "dee-password").returncode == 0
    assert (
        _run(
            tmp_path, "user", "add", "sup", "--password", "sup-password", "--role", "supervisor"
        ).returncode
        == 0
    )
    assert _run(tmp_path, "credits", "allocate", "dee", "1000").returncode == 0
    token = _run(tmp_path, "token", "dee").stdout.strip()
    sup_token = _run(tmp_path, "token", "sup").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    server = await start_server(
        tmp_path, nursery, CHINWAG_SIM_TOKENS_PER_S="20", CHINWAG_SIM_ANSWER_TOKENS="2000"
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        sid = (await http.post("/api/chat/sessions", json={}, headers=headers)).json()["sessionId"]
        async with (
            http.stream(
                "POST",
                f"/api/chat/sessions/{sid}/stream",
                json={"message": "long", "maxTokens": 4000},
                headers=headers,
            ) as r,
            http.stream(
                "GET",
                f"/api/chat/sessions/{sid}/observe",
                headers={"Authorization": f"Bearer {sup_token}"},
            ) as o,
        ):
            feed, ofeed = messages(r), messages(o)
            client = []
            while sum(m.event == "chunk" for m in client) < 2:
                client.append(await feed.__anext__())
            started = trio.current_time()
            server.proc.send_signal(signal.SIGTERM)
            client += [m async for m in feed]
            observed = [m async for m in ofeed]
        with trio.fail_after(15):
            code = await server.proc.wait()
        took = trio.current_time() - started
    assert code == 0 and took < 5  # streams settle at once; grace is 10 s
    for got in (events(client), events(observed)):
        assert got[-2].event == "error"
        assert got[-2].data["errorCode"] == "SERVER_SHUTTING_DOWN"
        assert got[-1].event == "done" and got[-1].data["finishReason"] == "shutdown"
    done = events(client)[-1].data

    # After a restart: persisted as interrupted, charged for what was produced, nothing reserved.
    server = await start_server(tmp_path, nursery)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            msgs = (await http.get(f"/api/chat/sessions/{sid}/messages", headers=headers)).json()
            assistant = msgs["messages"][-1]
            assert assistant["status"] == "interrupted"
            assert assistant["outputTokens"] == done["outputTokens"] >= 2
            bal = (await http.get("/api/credits/balance", headers=headers)).json()
            assert bal["reserved"] == 0 and bal["balance"] == 1000 - done["creditsCharged"]
    finally:
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await server.proc.wait() == 0
