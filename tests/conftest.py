"""Shared fixtures: settings on a temp SQLite file, the in-process app, a real server.

- ``app``/``client``: Quart's in-process test client (fine for JSON routes).
- ``live``: the real thing — Hypercorn's trio worker serving the app on
  127.0.0.1, port 0, started with ``nursery.start`` and stopped gracefully.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from server.app import create_app
from server.auth import hash_password
from server.settings import Settings

SECRET = "test-secret-0123456789-0123456789-abcdef"
PASSWORD = "correct horse battery"
_PASSWORD_HASH = hash_password(PASSWORD)  # scrypt once per run, not per user


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        db_path=tmp_path / "chinwag.db",
        jwt_secret=SECRET,
        sim_ttft_ms=0,
        sim_tokens_per_s=0,
        sim_answer_tokens=20,
        sse_heartbeat_ms=10_000,
        rate_limit=100_000,
    )


@dataclass
class Harness:
    """Makes users (with credits) and their auth headers against one app."""

    app: Any
    n: int = 0
    users: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def svc(self) -> Any:
        return self.app.extensions["chinwag"]

    def user(self, role: str = "enduser", credits: int = 0, name: str | None = None) -> dict[str, Any]:
        self.n += 1
        name = name or f"{role}{self.n}"
        user = self.svc.store.add_user(name, _PASSWORD_HASH, role, f"{name}@example.com")
        self.svc.ledger.open_account(user["id"])
        if credits:
            self.svc.ledger.allocate(user["id"], credits, reason="test")
        token = self.svc.tokens.mint(user["id"], name, role)
        user["headers"] = {"Authorization": f"Bearer {token}"}
        user["token"] = token
        return user


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    app = create_app(settings)
    async with app.test_app():
        yield app


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def harness(app: Any) -> Harness:
    return Harness(app)


@dataclass
class Live:
    url: str
    app: Any
    harness: Harness
    http: httpx.AsyncClient


async def start_live(settings: Settings, nursery: trio.Nursery) -> tuple[Any, str, trio.Event, trio.Event]:
    app = create_app(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 2
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            stopped.set()

    binds = await nursery.start(run)
    return app, binds[0], stop, stopped


@pytest.fixture
async def live_factory(nursery: trio.Nursery) -> AsyncIterator[Any]:
    """Start real servers with given settings; all are stopped gracefully at the end."""
    running: list[tuple[trio.Event, trio.Event, httpx.AsyncClient]] = []

    async def make(settings: Settings) -> Live:
        app, url, stop, stopped = await start_live(settings, nursery)
        http = httpx.AsyncClient(base_url=url, timeout=10)
        running.append((stop, stopped, http))
        return Live(url, app, Harness(app), http)

    yield make
    for stop, stopped, http in running:
        await http.aclose()
        stop.set()
        with trio.fail_after(10):
            await stopped.wait()


@pytest.fixture
async def live(live_factory: Any, settings: Settings) -> Live:
    return await live_factory(settings)


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)
