"""The SQLite writer (server.db): light writes on the loop when it is idle, in
order behind queued writes otherwise, and the writer's own WAL checkpoints."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

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
