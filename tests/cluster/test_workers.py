"""``chinwag serve --workers N``: real processes on one port, one parent, clean exits."""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
from pathlib import Path

import httpx
import trio

from server.cluster.redis import open_redis

from .conftest import REDIS_URL, require_redis

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
    # What a dead set of workers left: one open reservation. The parent releases it
    # once, before the workers start (they never recover: one could release another's).
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
        out = b""
        with trio.fail_after(30):
            while (found := re.search(rb"2 workers on (http://127\.0\.0\.1:\d+)", out)) is None:
                chunk = await proc.stdout.receive_some()
                assert chunk, out
                out += chunk
        url = found.group(1).decode()
        with ledger.Ledger(tmp_path / "chinwag.db") as book:
            assert book.open_reservations("u1") == [] and book.balance("u1").available == 100
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
