"""Model providers behind one seam (:mod:`server.providers.base`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..settings import Settings
from ..timers import Timers
from .base import Provider


@asynccontextmanager
async def open_provider(
    settings: Settings, timers: Timers | None = None
) -> AsyncIterator[Provider]:
    """The configured provider, open for as long as the block runs.

    ``timers``: the process's timer service, which paces the simulated model
    (one heap for every stream's token deadlines, not a trio sleep each).
    """
    if settings.provider == "bedrock":
        from .bedrock import BedrockProvider

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        async with BedrockProvider.open(
            settings.bedrock_endpoint_url,
            region,
            max_attempts=settings.upstream_max_attempts,
            read_timeout=settings.bedrock_read_timeout_ms / 1000,
        ) as provider:
            yield provider
    else:
        from .simulated import SimulatedProvider

        yield SimulatedProvider(
            ttft_ms=settings.sim_ttft_ms,
            tokens_per_s=settings.sim_tokens_per_s,
            answer_tokens=settings.sim_answer_tokens,
            timers=timers,
        )
