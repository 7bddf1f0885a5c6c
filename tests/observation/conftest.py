"""Fixtures: a counting SSE encoder and a small-ring manager that uses it."""

from __future__ import annotations

import pytest

from observation import ObservationManager

from .helpers import CountingEncoder


@pytest.fixture
def encode() -> CountingEncoder:
    return CountingEncoder()


@pytest.fixture
def manager(encode: CountingEncoder) -> ObservationManager:
    return ObservationManager(ring_size=8, linger=30.0, encode=encode)
