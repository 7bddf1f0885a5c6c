"""The PostgreSQL store under faults: killed connections, an exhausted pool, secrets in URLs."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from server.storage import PostgresStore, StoreUnavailable, open_store

PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture
def app() -> str:
    return f"store-test-{secrets.token_hex(4)}"


@pytest.fixture
def raw(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


def _pids(raw: psycopg.Connection[Any], app: str, *, waiting: bool = False) -> list[int]:
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    if waiting:
        sql += " AND wait_event_type = 'Lock'"
    return [row[0] for row in raw.execute(sql, (app,)).fetchall()]


def _kill(raw: psycopg.Connection[Any], pids: list[int]) -> None:
    for pid in pids:
        raw.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _await_lock_waiter(raw: psycopg.Connection[Any], app: str, not_: int = 0) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pids := [pid for pid in _pids(raw, app, waiting=True) if pid != not_]:
            return pids[0]
        time.sleep(0.005)
    raise AssertionError("the store never waited on the lock")


def test_connections_killed_between_calls_are_replaced(
    pg_url: str, app: str, raw: psycopg.Connection[Any]
) -> None:
    with PostgresStore(pg_url, application_name=app) as store:
        alice = store.add_user("alice", "h", "enduser")["id"]
        _kill(raw, _pids(raw, app))
        assert store.user_by_id(alice) is not None  # a read, retried on a fresh connection
        _kill(raw, _pids(raw, app))
        session = store.create_session(alice, session_id=None, title="", model_id="", source="")
        assert session is not None  # a write, on a fresh connection
        _kill(raw, _pids(raw, app))
        store.finish_message("none", content="", status="x", input_tokens=0, output_tokens=0,
                             credits_charged=0, finish_reason="stop")  # fmt: skip
        _kill(raw, _pids(raw, app))
        store.add_telemetry("t", "{}")
        assert len(store.recent_telemetry()) == 1


def test_a_message_killed_mid_transaction_is_not_written(
    pg_url: str, app: str, raw: psycopg.Connection[Any]
) -> None:
    with PostgresStore(pg_url, application_name=app) as store:
        alice = store.add_user("alice", "h", "enduser")["id"]
        session = store.create_session(alice, session_id="s", title="", model_id="", source="")
        assert session is not None
        holder = psycopg.connect(pg_url)  # a slow writer holding the session's row
        holder.execute("SELECT 1 FROM chat_sessions WHERE id = 's' FOR UPDATE")
        failure: list[BaseException] = []

        def add() -> None:
            try:
                store.add_message("s", alice, role="user", content="lost?", model_id="m")
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=add)
        thread.start()
        try:
            # Killed mid-transaction, retried (nothing was committed), killed again.
            first = _await_lock_waiter(raw, app)
            _kill(raw, [first])
            _kill(raw, [_await_lock_waiter(raw, app, not_=first)])
            thread.join(30)
        finally:
            holder.rollback()
            holder.close()
        assert len(failure) == 1 and isinstance(failure[0], StoreUnavailable)
        assert store.list_messages("s") == ([], 0)
        assert store.add_message("s", alice, role="user", content="again", model_id="m")["seq"] == 1


def test_an_exhausted_pool_is_unavailable_not_a_hang(
    pg_url: str, app: str, raw: psycopg.Connection[Any]
) -> None:
    with PostgresStore(pg_url, application_name=app, max_connections=1, pool_timeout=0.2) as store:
        alice = store.add_user("alice", "h", "enduser")["id"]
        store.create_session(alice, session_id="s", title="", model_id="", source="")
        holder = psycopg.connect(pg_url)
        holder.execute("SELECT 1 FROM chat_sessions WHERE id = 's' FOR UPDATE")
        busy = threading.Thread(
            target=lambda: store.add_message("s", alice, role="user", content="x", model_id="m")
        )
        busy.start()
        try:
            _await_lock_waiter(raw, app)
            with pytest.raises(StoreUnavailable, match="pooled connections are busy"):
                store.user_by_id(alice)
        finally:
            holder.rollback()
            holder.close()
            busy.join(30)
        assert store.list_messages("s")[1] == 1


def test_an_unreachable_database_is_named_without_its_password() -> None:
    with pytest.raises(StoreUnavailable) as info:
        open_store(f"postgresql://chinwag:{PASSWORD}@127.0.0.1:1/chinwag", connect_timeout=1)
    assert "postgresql://chinwag:***@127.0.0.1:1/chinwag" in str(info.value)
    chain: BaseException | None = info.value
    while chain is not None:
        assert PASSWORD not in str(chain)
        chain = chain.__cause__ or chain.__context__
