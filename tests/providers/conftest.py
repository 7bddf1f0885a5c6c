"""Fixtures for the provider tests: dummy AWS credentials, a trio-asyncio loop,
FakeBedrock on 127.0.0.1 port 0, and a BedrockProvider (the real aiobotocore
client) pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio_asyncio

from server.providers.bedrock import BedrockProvider
from server.providers.fake_bedrock import FakeBedrock, FakeSettings

#: Looked for in captured logs: it must never appear there.
from tests.conftest import SECRET_KEY as SECRET_KEY


@pytest.fixture(autouse=True)
def _aws(aws_env: None, fast_backoff: None) -> None:
    """Every provider test: dummy AWS credentials and 1 ms retry backoff (tests/conftest.py)."""


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
