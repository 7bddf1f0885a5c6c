"""Fixtures for the store's tests, each run against both backends (``backend``: sqlite, postgres).

- ``target``: where a store lives (a SQLite path or a PostgreSQL URL to a
  fresh schema), to open stores on it and reach its tables with raw SQL.
- ``store``: an empty store of that backend, closed after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.storage import StoreBackend, open_store
from tests.storage.pg import pg_database as pg_database  # the fixtures, for this directory
from tests.storage.pg import pg_url as pg_url
from tests.storage.pg import raw_sql, skip_unreachable

BACKENDS = ["sqlite", "postgres"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip_unreachable(items)


@dataclass(frozen=True)
class Target:
    backend: str
    url: str

    def open(self) -> StoreBackend:
        return open_store(self.url)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return raw_sql(self.backend, self.url, statement, params)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Target:
    if backend == "sqlite":
        return Target("sqlite", str(tmp_path / "chinwag.db"))
    return Target("postgres", request.getfixturevalue("pg_url"))


@pytest.fixture
def store(target: Target) -> Iterator[StoreBackend]:
    with target.open() as opened:
        yield opened
