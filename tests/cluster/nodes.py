"""Real ``chinwag serve`` processes on loopback as one cluster: one PostgreSQL database
(a schema of the test's own), one Redis key prefix of the test's own.

``Cluster.start(name)`` starts a node and waits until it serves; ``kill`` is
``kill -9``; ``stop`` is SIGTERM and a clean exit. Users are made directly in
the shared database and their tokens minted with the nodes' JWT secret, as
an operator's tooling would. At the end every node is stopped, the Redis
keys of the prefix are deleted (SCAN + DEL on the prefix only).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import ledger
from server.auth import TokenService
from server.cluster.redis import open_redis
from server.storage import open_store

from .conftest import REDIS_URL, require_redis

SECRET = "cluster-test-secret-0123456789-abcdefgh"


@dataclass
class Node:
    name: str
    url: str
    proc: trio.Process
    http: httpx.AsyncClient
    log: Path


@dataclass
class Cluster:
    tmp: Path
    database_url: str
    redis_url: str
    prefix: str
    env: dict[str, str]
    nursery: trio.Nursery
    nodes: dict[str, Node] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    n: int = 0

    def __post_init__(self) -> None:
        self.store = open_store(self.database_url)
        self.book = ledger.open_ledger(self.database_url)
        self.tokens = TokenService(SECRET, ttl_s=3600)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    async def start(self, name: str, **env: str) -> Node:
        """Start node ``name`` (CHINWAG_NODE_ID) and wait until it answers health."""
        log = self.tmp / f"node-{name}.log"
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")},
            "CHINWAG_DB": str(self.tmp / "unused.db"),
            "CHINWAG_DATABASE_URL": self.database_url,
            "CHINWAG_REDIS_URL": self.redis_url,
            "CHINWAG_NODE_ID": name,
            "CHINWAG_JWT_SECRET": SECRET,
            "CHINWAG_TEST_SCENARIOS": "1",
            "CHINWAG_SIM_TTFT_MS": "0",
            "CHINWAG_SIM_TOKENS_PER_S": "0",
            "CHINWAG_SIM_ANSWER_TOKENS": "1000",
            "CHINWAG_SHUTDOWN_GRACE_MS": "3000",
            "CHINWAG_RATE_LIMIT": "100000",
            **self.env,
            **env,
        }
        command = [sys.executable, "-m", "server.cli", "serve", "--port", "0"]
        with log.open("ab") as sink:
            proc = await trio.lowlevel.open_process(
                command, env=environment, stdout=-1, stderr=sink
            )
        url = await announced_url(proc, rb"listening on (http://127\.0\.0\.1:\d+)", log)
        node = Node(name, url, proc, httpx.AsyncClient(base_url=url, timeout=30), log)
        self.nodes[name] = node
        await until_true(lambda: healthy(node), within=30)
        return node

    async def start_all(self, names: str, **env: str) -> None:
        """Start several nodes (one letter each) at once."""
        async with trio.open_nursery() as starting:
            for name in names:
                starting.start_soon(partial(self.start, name, **env))

    def resume(
        self, node: str, sid: str, user: dict[str, Any], stream_id: str, after: int | None
    ) -> Any:
        """``GET …/stream`` (SPEC §5.4) through ``node``: replay after ``after``, then live."""
        return self[node].http.stream(
            "GET",
            f"/api/chat/sessions/{sid}/stream",
            params={"streamingSessionId": stream_id},
            headers={**user["headers"], "Last-Event-ID": str(after)},
        )

    def kill(self, name: str) -> None:
        """``kill -9``: no clean-up of any kind."""
        self.killed.add(name)
        self.nodes[name].proc.send_signal(signal.SIGKILL)

    async def stop(self, name: str) -> int:
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            return await node.proc.wait()

    def user(self, role: str = "enduser", credits: int = 0) -> dict[str, Any]:
        self.n += 1
        name = f"{role}{self.n}-{secrets.token_hex(2)}"
        user = self.store.add_user(name, "x", role, f"{name}@example.com")
        self.book.open_account(user["id"])
        if credits:
            self.book.allocate(user["id"], credits, reason="test")
        token = self.tokens.mint(user["id"], name, role)
        user["headers"] = {"Authorization": f"Bearer {token}"}
        return user

    async def session(self, node: str, user: dict[str, Any]) -> str:
        r = await self[node].http.post("/api/chat/sessions", json={}, headers=user["headers"])
        assert r.status_code in (200, 201), r.text
        return str(r.json()["sessionId"])

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text()[-4000:]}" for n in self.nodes.values())

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.http.aclose()
            if node.proc.returncode is None:
                node.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            for node in self.nodes.values():
                await node.proc.wait()
        unclean = []
        for node in self.nodes.values():
            if node.proc.returncode is None:
                node.proc.kill()
                await node.proc.wait()
            if node.name not in self.killed and node.proc.returncode != 0:
                unclean.append(f"{node.name} exited {node.proc.returncode}")
            if '"exception":' in node.log.read_text():
                unclean.append(f"{node.name} logged an exception")
        self.store.close()
        self.book.close()
        # Every node that was not killed shut down cleanly, and none logged a traceback.
        assert not unclean, f"{unclean}\n{self.logs()}"


async def announced_url(proc: trio.Process, pattern: bytes, log: Path | None = None) -> str:
    """The URL a starting ``chinwag serve`` prints on stdout (group 1 of ``pattern``)."""
    assert proc.stdout is not None
    out = b""
    with trio.fail_after(30):
        while (found := re.search(pattern, out)) is None:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                tail = (await trio.Path(log).read_text())[-3000:] if log else ""
                raise AssertionError(f"it exited: {out!r} {tail}")
            out += chunk
    return found.group(1).decode()


async def until_true(check: Callable[[], Awaitable[bool]], *, within: float) -> None:
    """Poll another process's state (no event of ours can say when it changes)."""
    with trio.fail_after(within):
        while not await check():  # noqa: ASYNC110 - another process's state: nothing to await
            await trio.sleep(0.05)


async def healthy(node: Node) -> bool:
    return (await node.http.get("/api/health")).status_code == 200


def paced(rate: int, headers: dict[str, str]) -> dict[str, str]:
    """The user's headers plus a per-request simulated token rate (SPEC §8)."""
    return {**headers, "X-Sim-Tokens-Per-S": str(rate)}


def post_stream(
    node: Node, sid: str, headers: dict[str, str], message: str, max_tokens: int
) -> AbstractAsyncContextManager[httpx.Response]:
    """Start a stream on ``node`` (SPEC §5): the open response, read with ``messages``."""
    return node.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": message, "maxTokens": max_tokens},
        headers=headers,
    )


@asynccontextmanager
async def open_cluster(
    tmp_path: Path, pg_url: str, nursery: trio.Nursery, redis_url: str = REDIS_URL, **env: str
) -> AsyncIterator[Cluster]:
    require_redis()
    name = f"test-{secrets.token_hex(4)}"
    cluster = Cluster(tmp_path, pg_url, f"{redis_url}?prefix={name}", name, env, nursery)
    try:
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await cluster.close()
            try:
                async with open_redis(redis_url) as redis:
                    await redis.delete_prefix(f"chinwag:{name}:")
            except Exception:  # the test's own Redis may be gone already
                pass


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str, nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    """Three nodes a, b, c (lease 2 s, paced answers possible, disconnect grace 0)."""
    async with open_cluster(tmp_path, pg_url, nursery, CHINWAG_NODE_LEASE_MS="2000") as made:
        await made.start_all("abc")
        yield made
