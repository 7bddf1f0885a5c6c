"""Shared fixtures: settings on a temp SQLite file, the in-process app, a real server.

- ``app``/``client``: Quart's in-process test client (fine for JSON routes).
- ``live``: the real thing — Hypercorn's trio worker serving the app on
  127.0.0.1, port 0, started with ``nursery.start`` and stopped gracefully.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio
from botocore.retries.standard import ExponentialBackoff
from hypercorn.trio import serve

from server.app import create_app
from server.auth import hash_password
from server.serving import hypercorn_config
from server.settings import Settings
from tests.storage.pg import pg_database as pg_database  # fixtures, for every test
from tests.storage.pg import pg_url as pg_url
from tests.storage.pg import raw_sql, skip_unreachable

SECRET = "test-secret-0123456789-0123456789-abcdef"
PASSWORD = "correct horse battery"
_PASSWORD_HASH = hash_password(PASSWORD)  # scrypt once per run, not per user


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip_unreachable(items)  # PostgreSQL absent: one reason line (in CI: a failure)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every test that uses ``settings`` runs on both storage backends."""
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    # PostgreSQL: a fresh schema of the run's own database (tests/storage/pg.py).
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    return Settings(
        db_path=tmp_path / "chinwag.db",
        database_url=url,
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

    def user(
        self, role: str = "enduser", credits: int = 0, name: str | None = None
    ) -> dict[str, Any]:
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


SECRET_KEY = "dummy-secret-k3y-never-logged"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials from the environment; never read ~/.aws, never ask IMDS."""
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore sleeps rand(0..2^attempt) s between retries; the count of
    retries is what the tests check, not the sleep, so make it 1 ms."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.001)


@dataclass
class Live:
    url: str
    app: Any
    harness: Harness
    http: httpx.AsyncClient


async def start_live(
    settings: Settings, nursery: trio.Nursery
) -> tuple[Any, str, trio.Event, trio.Event]:
    app = create_app(settings)
    config = hypercorn_config(settings, "127.0.0.1", 0)
    config.graceful_timeout = 2
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            if settings.provider == "bedrock":
                # aiobotocore needs an asyncio loop around the whole server (as `chinwag serve`).
                async with trio_asyncio.open_loop():
                    await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
            else:
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


def db_sql(settings: Settings, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement on the test's database (SQLite or PostgreSQL), outside the server."""
    backend = "postgres" if settings.database_url else "sqlite"
    return raw_sql(backend, settings.database, statement, params)


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)
