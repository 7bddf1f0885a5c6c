"""Fixtures for the ledger's tests, each run against both backends.

``backend`` is the one parameter: ``sqlite`` and ``postgres``. Every fixture
below follows it, so each test that uses ``ledger``, ``funded`` or
``target`` runs twice, once per backend, from the same code.

- ``ledger``: an empty ledger (SQLite in memory; PostgreSQL in a fresh schema).
- ``funded``: the same, where account ``"alice"`` holds 1000 credits.
- ``target``: where a ledger lives (a file path or a URL), to open more
  ledgers on it (threads, processes) and to reach its tables with raw SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger import LedgerBackend, SqliteLedger, open_ledger
from tests.storage.pg import pg_database as pg_database  # the fixtures, for this directory
from tests.storage.pg import pg_url as pg_url
from tests.storage.pg import raw_sql, skip_unreachable

BACKENDS = ["sqlite", "postgres"]


@dataclass(frozen=True)
class Target:
    """Where one test's ledger lives, on either backend."""

    backend: str
    url: str

    def open(self) -> LedgerBackend:
        return open_ledger(self.url)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement outside the ledger, on its own connection (``?`` placeholders)."""
        return raw_sql(self.backend, self.url, statement, params)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip_unreachable(items)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Target:
    if backend == "sqlite":
        return Target("sqlite", str(tmp_path / "chinwag.db"))
    return Target("postgres", request.getfixturevalue("pg_url"))


@pytest.fixture
def ledger(backend: str, request: pytest.FixtureRequest) -> Iterator[LedgerBackend]:
    if backend == "sqlite":
        book: LedgerBackend = SqliteLedger.memory()
    else:
        book = open_ledger(request.getfixturevalue("pg_url"))
    with book:
        yield book


@pytest.fixture
def funded(ledger: LedgerBackend) -> LedgerBackend:
    """An empty ledger where account ``"alice"`` holds 1000 credits."""
    ledger.open_account("alice")
    ledger.allocate("alice", 1000, reason="seed")
    return ledger


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A SQLite file, for the tests of what only SQLite has (WAL, its journal)."""
    return tmp_path / "chinwag.db"
