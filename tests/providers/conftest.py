"""Fixtures for the provider tests: dummy AWS credentials, a trio-asyncio loop,
FakeBedrock on 127.0.0.1 port 0, and a BedrockProvider (the real aiobotocore
client) pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from botocore.retries.standard import ExponentialBackoff

from server.providers.bedrock import BedrockProvider
from server.providers.fake_bedrock import FakeBedrock, FakeSettings

#: Looked for in captured logs: it must never appear there.
SECRET_KEY = "dummy-secret-k3y-never-logged"


@pytest.fixture(autouse=True)
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


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore sleeps rand(0..2^attempt) s between retries; the count of
    retries is what the tests check, not the sleep, so make it 1 ms."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.001)


@pytest.fixture
async def aio_loop() -> AsyncIterator[Any]:
    # pytest-trio gives the test the contextvars its fixtures set, so
    # trio_asyncio.current_loop set here is the test's loop.
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeBedrock:
    fb = FakeBedrock(FakeSettings(ttft_ms=0, tokens_per_s=0, answer_tokens=20))
    await nursery.start(fb.serve)
    return fb


OpenProvider = Callable[..., AbstractAsyncContextManager[BedrockProvider]]


@pytest.fixture
def open_provider(aio_loop: Any, fake: FakeBedrock) -> OpenProvider:
    """``async with open_provider(read_timeout=0.2, max_attempts=1) as p:``"""

    def open_(**options: Any) -> AbstractAsyncContextManager[BedrockProvider]:
        options = {"connect_timeout": 2, "read_timeout": 5, **options}
        return BedrockProvider.open(fake.url, "us-east-1", **options)

    return open_


@pytest.fixture
async def provider(open_provider: OpenProvider) -> AsyncIterator[BedrockProvider]:
    async with open_provider() as p:
        yield p
