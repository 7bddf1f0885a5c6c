"""``chinwag serve --workers N``: real processes on one port, one parent, clean exits."""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from server.cluster.redis import open_redis

from .conftest import REDIS_URL, require_redis
from .nodes import announced_url

SECRET = "workers-test-secret-0123456789-abcdefgh"


def env(tmp_path: Path, **more: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    return {
        **base,
        "CHINWAG_DB": str(tmp_path / "chinwag.db"),
        "CHINWAG_JWT_SECRET": SECRET,
        "CHINWAG_NODE_ID": "w",
        "CHINWAG_SHUTDOWN_GRACE_MS": "2000",
        **more,
    }


async def test_two_workers_serve_one_port_and_stop_on_sigterm(tmp_path: Path):
    require_redis()
    name = f"test-{secrets.token_hex(4)}"
    # Another node's live reservation (another machine of the cluster, say): nothing
    # at start-up may release it — in cluster mode the survivors recover a dead
    # node's streams through Redis, never a blanket sweep of the database.
    import ledger

    with ledger.Ledger(tmp_path / "chinwag.db") as book:
        book.open_account("u1")
        book.allocate("u1", 100)
        book.reserve("u1", 40, model_id="m", streaming_session_id="stream-dead")
    command = [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0"]
    proc = await trio.lowlevel.open_process(
        command,
        env=env(tmp_path, CHINWAG_REDIS_URL=f"{REDIS_URL}?prefix={name}"),
        stdout=-1,
    )
    assert proc.stdout is not None
    try:
        url = await announced_url(proc, rb"2 workers on (http://127\.0\.0\.1:\d+)")
        with ledger.Ledger(tmp_path / "chinwag.db") as book:
            assert [r.streaming_session_id for r in book.open_reservations("u1")] == ["stream-dead"]
            assert book.balance("u1").available == 60
        nodes: set[str] = set()
        with trio.fail_after(60):
            while nodes != {"w-0", "w-1"}:
                # A new connection each time: the kernel spreads them over the workers.
                async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                    answer = await http.get("/api/health")
                assert answer.status_code == 200
                nodes.add(answer.json()["node"])
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:
            try:
                await http.get("/api/health")
            except httpx.ConnectError:
                pass
            else:
                raise AssertionError("a worker is still serving")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        async with open_redis(REDIS_URL) as redis:
            await redis.delete_prefix(f"chinwag:{name}:")


async def test_more_than_one_worker_needs_redis(tmp_path: Path):
    command = [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0"]
    done = await trio.run_process(command, env=env(tmp_path), capture_stderr=True, check=False)
    assert done.returncode == 2
    assert b"CHINWAG_REDIS_URL" in done.stderr
    assert b"Traceback" not in done.stderr


@asynccontextmanager
async def aclosing_client(http: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """Close a client that has already been used (httpx cannot enter it again)."""
    try:
        yield http
    finally:
        await http.aclose()


async def test_observe_and_resume_through_the_shared_port(tmp_path: Path):
    """A stream served by one worker, observed late and resumed through the other."""
    require_redis()
    import ledger
    from server.auth import TokenService
    from server.storage import open_store
    from tests.sse import events, messages

    name = f"test-{secrets.token_hex(4)}"
    command = [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0"]
    proc = await trio.lowlevel.open_process(
        command,
        env=env(
            tmp_path,
            CHINWAG_REDIS_URL=f"{REDIS_URL}?prefix={name}",
            CHINWAG_TEST_SCENARIOS="1",
            CHINWAG_SIM_TTFT_MS="0",
            CHINWAG_SIM_ANSWER_TOKENS="1000",
            CHINWAG_RATE_LIMIT="100000",
        ),
        stdout=-1,
    )
    assert proc.stdout is not None
    try:
        url = await announced_url(proc, rb"2 workers on (http://127\.0\.0\.1:\d+)")
        store = open_store(tmp_path / "chinwag.db")
        with ledger.Ledger(tmp_path / "chinwag.db") as book:
            alice = store.add_user("alice", "x", "enduser", "a@example.com")
            sup = store.add_user("sup", "x", "supervisor", "s@example.com")
            book.open_account(alice["id"])
            book.allocate(alice["id"], 1_000_000)
        store.close()
        tokens = TokenService(SECRET, ttl_s=3600)
        mine = {"Authorization": f"Bearer {tokens.mint(alice['id'], 'alice', 'enduser')}"}
        staff = {"Authorization": f"Bearer {tokens.mint(sup['id'], 'sup', 'supervisor')}"}

        async def on_other_worker(than: str) -> httpx.AsyncClient:
            """A keep-alive connection that landed on the other worker."""
            with trio.fail_after(30):
                while True:
                    http = httpx.AsyncClient(base_url=url, timeout=30)
                    if (await http.get("/api/health")).json()["node"] != than:
                        return http
                    await http.aclose()

        async with httpx.AsyncClient(base_url=url, timeout=30) as first:
            producer = (await first.get("/api/health")).json()["node"]
            sid = (await first.post("/api/chat/sessions", json={}, headers=mine)).json()[
                "sessionId"
            ]
            async with first.stream(
                "POST",
                f"/api/chat/sessions/{sid}/stream",
                json={"message": "go", "maxTokens": 80},
                headers={**mine, "X-Sim-Tokens-Per-S": "40"},
            ) as r:
                stream_id = r.headers["x-streaming-session-id"]
                feed = messages(r)
                client = []
                async for msg in feed:
                    client.append(msg)
                    if len(events(client)) >= 5:
                        break
                other = await on_other_worker(producer)
                async with (
                    aclosing_client(other),
                    other.stream("GET", f"/api/chat/sessions/{sid}/observe", headers=staff) as o,
                ):
                    observed = []
                    async for msg in messages(o):
                        observed.append(msg)
                        if msg.event == "done":
                            break
                async for msg in feed:
                    client.append(msg)
                    if msg.event == "done":
                        break

        def triples(msgs: list) -> list:  # type: ignore[type-arg]
            return [(m.id, m.event, m.data) for m in events(msgs) if m.id is not None]

        assert triples(observed) == triples(client)
        assert events(client)[-1].data["outputTokens"] == 80
        # A resume through the other worker replays the cluster's copy after Last-Event-ID.
        other = await on_other_worker(producer)
        async with (
            aclosing_client(other),
            other.stream(
                "GET",
                f"/api/chat/sessions/{sid}/stream",
                params={"streamingSessionId": stream_id},
                headers={**mine, "Last-Event-ID": "40"},
            ) as again,
        ):
            assert again.status_code == 200
            replay = []
            async for msg in messages(again):
                replay.append(msg)
                if msg.event == "done":
                    break
        assert triples(replay) == [t for t in triples(client) if t[0] > 40]
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        async with open_redis(REDIS_URL) as redis:
            await redis.delete_prefix(f"chinwag:{name}:")


async def test_redis_that_does_not_answer_is_one_line_at_start(tmp_path: Path):
    from .conftest import free_port

    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    for workers in ("1", "2"):
        command = [sys.executable, "-m", "server.cli", "serve", "--workers", workers, "--port", "0"]
        done = await trio.run_process(
            command, env=env(tmp_path, CHINWAG_REDIS_URL=url), capture_stderr=True, check=False
        )
        assert done.returncode == 2
        last = done.stderr.decode().strip().splitlines()[-1]
        assert last.startswith("error: CHINWAG_REDIS_URL cannot be used: Redis at redis://:***@")
        assert b"hunter2secret" not in done.stderr and b"Traceback" not in done.stderr
