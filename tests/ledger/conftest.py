"""Fixtures for the ledger's tests: an in-memory ledger and a file path for real ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger import Ledger


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger.memory() as book:
        yield book


@pytest.fixture
def funded(ledger: Ledger) -> Ledger:
    """An in-memory ledger where account ``"alice"`` holds 1000 credits."""
    ledger.open_account("alice")
    ledger.allocate("alice", 1000, reason="seed")
    return ledger


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chinwag.db"
