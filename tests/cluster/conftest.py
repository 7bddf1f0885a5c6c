"""Fixtures for the cluster tests: the real Redis, one key prefix per test.

Redis is ``CHINWAG_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).
Every test gets its own prefix (``chinwag-test:<random>:``) and its keys are
deleted afterwards with SCAN + DEL on that prefix: nothing else in the
database is touched, and nothing here ever runs FLUSHDB.

When Redis is not reachable every test here is skipped with one reason
line; with ``CI`` set they fail instead (in CI the cluster must be tested).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from server.cluster.redis import ClusterRedis, open_redis
from tests.storage.pg import in_ci

REDIS_URL = os.environ.get("CHINWAG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HERE = Path(__file__).resolve().parent


@cache
def unreachable_reason() -> str | None:
    """None if Redis answers PING; else the one reason line every skip gives."""
    where = urlsplit(REDIS_URL)
    host, port = where.hostname or "127.0.0.1", where.port or 6379
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"Redis not reachable at {host}:{port}: {exc}"
    if not answer.startswith(b"+PONG"):
        return f"Redis not reachable at {host}:{port}: answered {answer[:40]!r}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if in_ci():
        return  # the fixtures fail instead
    reason = unreachable_reason()
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def require_redis() -> None:
    reason = unreachable_reason()
    if reason is not None:
        pytest.fail(f"{reason} (CI is set: cluster mode must be tested)")


def new_prefix() -> str:
    return f"chinwag-test:{secrets.token_hex(4)}:"


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[ClusterRedis]:
    """A client on the test's own prefix; its keys are deleted afterwards."""
    require_redis()
    async with open_redis(REDIS_URL, prefix=prefix) as client:
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.delete_prefix()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OwnRedis:
    """A redis-server of the test's own, on a free port: stop it, start it again."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self) -> None:
        with trio.fail_after(10):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            return
                except OSError:
                    pass
                await trio.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    """Started and answering PING."""
    require_redis()
    server = OwnRedis(free_port())
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()
