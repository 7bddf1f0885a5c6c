"""PostgreSQL trouble under a real server (issue 11): connections killed while
streams open and settle, and the database unreachable for a while. Nothing is
half-written, the ledger verifies, and the server recovers without a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from psycopg import sql

from server.settings import Settings
from tests.conftest import SECRET
from tests.e2e.test_streaming import new_session
from tests.sse import events, messages
from tests.storage.pg import MAINTENANCE_URL, PgDatabase


@pytest.fixture
def pg_settings(tmp_path: Path, pg_url: str) -> Settings:
    return Settings(
        db_path=tmp_path / "unused.db",
        database_url=pg_url,
        jwt_secret=SECRET,
        sim_ttft_ms=0,
        sim_tokens_per_s=50,
        sim_answer_tokens=30,
        rate_limit=100_000,
    )


def kill_connections(db: PgDatabase) -> int:
    """Terminate every connection to the test database; how many."""
    import psycopg

    with psycopg.connect(MAINTENANCE_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (db.name,),
        ).fetchall()
    return len(rows)


async def test_connections_killed_while_streams_open_and_settle(
    live_factory: Any, pg_settings: Settings, pg_database: PgDatabase, monkeypatch: Any
) -> None:
    monkeypatch.setattr("server.abandoned.RETRY_S", 0.2)
    live = await live_factory(pg_settings)
    alice = live.harness.user(credits=1_000_000)
    svc = live.harness.svc
    sessions = [await new_session(live, alice) for _ in range(12)]
    outcomes: dict[str, Any] = {}  # session -> "refused <status>" | the done event's data

    async def stream(sid: str) -> None:
        async with live.http.stream(
            "POST",
            f"/api/chat/sessions/{sid}/stream",
            json={"message": "hi"},
            headers=alice["headers"],
        ) as r:
            if r.status_code != 200:
                body = await r.aread()
                assert r.status_code == 503, body  # a plain JSON refusal, never a 500
                assert r.headers["retry-after"]
                outcomes[sid] = f"refused {r.status_code}"
                return
            got = [m async for m in messages(r)]
            evs = events(got)
            outcomes[sid] = evs[-1].data if evs and evs[-1].event == "done" else "cut"

    killed = 0
    async with trio.open_nursery() as nursery:
        for sid in sessions:
            nursery.start_soon(stream, sid)
            await trio.sleep(0.05)  # streams open while others settle
            if sid in sessions[::3]:
                killed += kill_connections(pg_database)
    assert killed > 0
    with trio.fail_after(10):
        for run in svc.hub.live():
            await run.wait_done()
        # What could not be ended (an open whose commit was lost, an ending the
        # database refused) is ended by the hub's tries, beside these checks else.
        await svc.hub.abandoned.drained()

    # Nothing half-written: every message is finished, or still "streaming" with its
    # reservation still open (what start-up recovery releases) — never one without the other.
    open_holds = {r.streaming_session_id for r in svc.ledger.open_reservations(alice["id"])}
    for sid in sessions:
        rows, _ = svc.store.list_messages(sid)
        assert [m["role"] for m in rows] in ([], ["user", "assistant"]), rows
        if not rows:
            assert str(outcomes[sid]).startswith("refused")
            continue
        answer = rows[1]
        if answer["status"] == "streaming":
            assert answer["streaming_session_id"] in open_holds
        else:
            assert answer["streaming_session_id"] not in open_holds
            charged = svc.ledger.charges_for_stream(answer["streaming_session_id"])
            assert charged == answer["credits_charged"]
            if isinstance(outcomes[sid], dict):
                assert outcomes[sid]["creditsCharged"] == answer["credits_charged"]
    assert svc.ledger.verify() == []
    assert sum(isinstance(o, dict) for o in outcomes.values()) > 0

    # Recovered without a restart: a new stream runs to its end.
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "again"},
        headers=alice["headers"],
    ) as r:
        assert r.status_code == 200
        assert events([m async for m in messages(r)])[-1].data["finishReason"] == "stop"


def allow_connections(db: PgDatabase, allowed: bool) -> None:
    import psycopg

    with psycopg.connect(MAINTENANCE_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(db.name), sql.Literal(allowed)
            )
        )


async def test_database_unreachable_is_503_then_recovers_without_restart(
    live_factory: Any, pg_settings: Settings, pg_database: PgDatabase
) -> None:
    live = await live_factory(pg_settings)
    alice = live.harness.user(credits=10_000)
    sid = await new_session(live, alice)
    allow_connections(pg_database, False)
    try:
        kill_connections(pg_database)
        r = await live.http.get("/api/chat/sessions", headers=alice["headers"])
        assert r.status_code == 503
        assert r.json()["errorCode"] == "SERVICE_UNAVAILABLE" and r.headers["retry-after"]
        assert "password" not in r.text and "postgresql://" not in r.text
        r = await live.http.post(
            f"/api/chat/sessions/{sid}/stream", json={"message": "x"}, headers=alice["headers"]
        )
        assert r.status_code == 503
        r = await live.http.get("/api/health")
        assert r.status_code == 503 and r.json()["database"]["status"] == "unavailable"
    finally:
        allow_connections(pg_database, True)
    # Back: no restart needed (the pool reconnects with its own back-off: poll health).
    for _ in range(100):  # 10 s at most
        if (await live.http.get("/api/health")).status_code == 200:
            break
        await trio.sleep(0.1)
    r = await live.http.get("/api/chat/sessions", headers=alice["headers"])
    assert r.status_code == 200 and [s["sessionId"] for s in r.json()["sessions"]] == [sid]
    assert live.harness.svc.ledger.balance(alice["id"]).available == 10_000
    assert live.harness.svc.ledger.verify() == []
