"""The SQLite writer (server.db): light writes on the loop when it is idle, in
order behind queued writes otherwise, and the writer's own WAL checkpoints."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import ledger
from server import db as dbmod
from server.db import Db
from server.storage import open_store


def _open(path: Path, *, shared: bool = False) -> Db:
    return Db.open(str(path), open_store(path), ledger.open_ledger(path), shared=shared)


def _thread_of_write(db: Db):
    async def write(light: bool) -> str:
        return await db.write(lambda store, book: threading.current_thread().name, light=light)

    return write


async def test_light_writes_run_on_the_loop_only_while_the_writer_is_idle(tmp_path, nursery):
    db = _open(tmp_path / "a.db")
    try:
        await nursery.start(db.run)
        write = _thread_of_write(db)
        loop_thread = threading.current_thread().name
        assert await write(light=True) == loop_thread
        assert await write(light=False) != loop_thread  # a durable one: the writer's thread

        # While a batch is in the writer's thread, a light write queues behind it
        # (and so runs after it, in the thread), never beside it on the loop.
        in_thread, release = threading.Event(), threading.Event()
        order: list[str] = []

        def slow(store, book):
            in_thread.set()
            release.wait(10)
            order.append("slow")

        async def light_one() -> None:
            name = await db.write(
                lambda store, book: order.append("light") or threading.current_thread().name,
                light=True,
            )
            assert name != loop_thread

        async with trio.open_nursery() as inner:
            inner.start_soon(db.write, slow)
            await trio.to_thread.run_sync(in_thread.wait, 10)
            inner.start_soon(light_one)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert order == ["slow", "light"]
        assert await write(light=True) == loop_thread  # idle again
    finally:
        nursery.cancel_scope.cancel()
        db.close()


async def test_cluster_mode_never_writes_on_the_loop(tmp_path, nursery):
    db = _open(tmp_path / "b.db", shared=True)  # other processes share the file
    try:
        await nursery.start(db.run)
        assert await _thread_of_write(db)(light=True) != threading.current_thread().name
    finally:
        nursery.cancel_scope.cancel()
        db.close()


async def test_the_writer_checkpoints_the_wal_itself(tmp_path, nursery, monkeypatch):
    monkeypatch.setattr(dbmod, "CHECKPOINT_EVERY", 5)
    path = tmp_path / "c.db"
    db = _open(path)
    checkpoints = trio.Semaphore(0, max_value=100)
    token = trio.lowlevel.current_trio_token()
    real = dbmod._Checkpointer.__call__

    def noted(self) -> None:
        real(self)
        trio.from_thread.run_sync(checkpoints.release, trio_token=token)

    monkeypatch.setattr(dbmod._Checkpointer, "__call__", noted)
    try:
        # Neither writer connection checkpoints on its own (that would fsync on the loop).
        assert db.write_store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert db.write_ledger._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        await nursery.start(db.run)
        user = db.write_store.add_user("ann", "x", "enduser")

        def row(store, book) -> None:
            store.create_session(user["id"], session_id=None, title="t", model_id="m", source="web")

        for _ in range(5):
            await db.write(row, light=True)
        with trio.fail_after(10):
            await checkpoints.acquire()
        # Everything in the WAL is in the database file now.
        with sqlite3.connect(path) as conn:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == copied
        count = "SELECT count(*) FROM chat_sessions WHERE user_id = ?"
        assert db.store_backend.conn.execute(count, (user["id"],)).fetchone()[0] == 5
    finally:
        nursery.cancel_scope.cancel()
        db.close()


async def test_one_connection_writes_the_store_and_the_ledger(tmp_path, nursery):
    """On SQLite the writer's store and ledger share one connection (no commit of
    one drops the other's page cache): the connection stays NORMAL, a stream's
    opening switches nothing, and a settlement alone commits with FULL."""
    db = _open(tmp_path / "one.db")
    try:
        await nursery.start(db.run)
        conn = db.write_store.conn
        assert db.write_ledger._conn is conn
        user = await db.write(lambda store, book: store.add_user("ann", "x", "enduser"), light=True)
        await db.write(
            lambda store, book: book.open_account(user["id"]) and book.allocate(user["id"], 100)
        )
        session = await db.write(
            lambda store, book: store.create_session(
                user["id"], session_id=None, title="t", model_id="m", source="chat"
            )
        )
        seen: list[str] = []
        conn.set_trace_callback(seen.append)

        def open_turn(store, book):
            return store.open_turn(
                session["id"],
                user["id"],
                text="hi",
                model_id="m",
                streaming_session_id="s1",
                reserve=book.reservation(user["id"], 40, streaming_session_id="s1"),
            )

        held, _, _ = await db.write(open_turn, light=True)
        opening = [s for s in seen if "synchronous" in s]
        seen.clear()
        await db.write(lambda store, book: book.settle(held.id, 10))
        conn.set_trace_callback(None)
        assert opening == []
        syncs = [s for s in seen if "synchronous" in s or s.startswith(("BEGIN", "COMMIT"))]
        assert syncs == [
            "PRAGMA synchronous = FULL",
            "BEGIN IMMEDIATE",
            "COMMIT",
            "PRAGMA synchronous = NORMAL",
        ]
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        balance = await db.ledger.balance(user["id"])
        assert (balance.balance, balance.reserved) == (90, 0)
        assert await db.ledger.verify() == []
    finally:
        db.close()
    # The ledger left the shared connection to the store, which closed it.
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
