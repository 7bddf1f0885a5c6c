"""Fixtures shared by tests/server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from server.timers import Timers


@pytest.fixture
async def timers() -> AsyncIterator[Timers]:
    """An exact (grid 0) timer service, running for the test's duration."""
    t = Timers(grid=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        yield t
        nursery.cancel_scope.cancel()
