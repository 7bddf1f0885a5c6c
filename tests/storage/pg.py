"""A private PostgreSQL database for the tests, and a fresh schema in it per test.

``pg_database`` (session): connects to the maintenance database
(``CHINWAG_TEST_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/postgres``),
creates ``chinwag_test_<random>``, and at the end terminates that database's
connections and drops it. Nothing else on the server is touched.

``pg_url`` (per test): a new empty schema in that database, as a URL whose
``search_path`` is that schema, so every test starts from an empty database
as far as the code can tell (migrations included), at the cost of a
``CREATE SCHEMA``; dropped after the test.

When PostgreSQL is not reachable the PostgreSQL parameters are skipped, all
with the same one-line reason (marked at collection, so pytest folds them
into one line per file); with ``CI`` set (``CI=true``) they fail instead: in
CI a skip of the PostgreSQL backend is a failure.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

MAINTENANCE_URL = os.environ.get(
    "CHINWAG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@cache
def unreachable_reason() -> str | None:
    """None if PostgreSQL answers; else the one reason line every skip gives."""
    where = urlsplit(MAINTENANCE_URL)
    try:
        with psycopg.connect(MAINTENANCE_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"PostgreSQL not reachable at {where.hostname}:{where.port or 5432}: {first_line}"
    return None


def require_postgres() -> None:
    reason = unreachable_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI is set: the PostgreSQL backend must be tested)")
    pytest.skip(reason)


def uses_postgres(item: pytest.Item) -> bool:
    """Whether a collected test runs against PostgreSQL (its backend parameter, or its fixtures)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "postgres":
        return True
    names = getattr(item, "fixturenames", ())
    return "pg_database" in names or "pg_url" in names


def skip_unreachable(items: list[pytest.Item]) -> None:
    """Mark every PostgreSQL test skipped, with the one reason, if PostgreSQL is not there.

    Not in CI: there the ``pg_database`` fixture fails each of them instead.
    """
    if in_ci():
        return
    postgres = [item for item in items if uses_postgres(item)]
    if not postgres or (reason := unreachable_reason()) is None:
        return
    for item in postgres:
        if not item.get_closest_marker("skip"):
            item.add_marker(pytest.mark.skip(reason=reason))


def raw_sql(
    backend: str, url: str, statement: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection, outside the code under test.

    ``?`` placeholders on both backends; ``url`` is a SQLite path or a PostgreSQL URL.
    """
    if backend == "sqlite":
        conn = sqlite3.connect(url)
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as pg:
        cur = pg.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def with_database(url: str, name: str, **params: str) -> str:
    parts = urlsplit(url)
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, query, ""))


@dataclass(frozen=True)
class PgDatabase:
    name: str
    url: str

    def connect(self, url: str | None = None) -> psycopg.Connection[Any]:
        """A raw autocommit connection (to this database, or to ``url``)."""
        return psycopg.connect(url or self.url, autocommit=True)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[PgDatabase]:
    require_postgres()
    name = f"chinwag_test_{secrets.token_hex(4)}"
    with psycopg.connect(MAINTENANCE_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PgDatabase(name, with_database(MAINTENANCE_URL, name))
    finally:
        with psycopg.connect(MAINTENANCE_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def pg_url(pg_database: PgDatabase) -> Iterator[str]:
    """A URL to a fresh empty schema of the test database (its ``search_path``)."""
    schema = f"t_{secrets.token_hex(6)}"
    with pg_database.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_database(MAINTENANCE_URL, pg_database.name, options=f"-csearch_path={schema}")
    finally:
        with pg_database.connect() as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
