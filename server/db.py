"""The server's one door to durable state: the store and the ledger, awaitable,
never blocking the Trio thread on I/O that can stall it.

Both backends are synchronous (:mod:`server.storage`, :mod:`ledger`). A
:class:`Db` decides where each call runs:

- **SQLite.** Writes (and every commit's ``fsync``: the ledger commits with
  ``synchronous=FULL``) run in one worker thread, one at a time, on one write
  connection of their own, which the store and the ledger share (a commit
  by another connection would drop its page cache: opening a stream cost
  ~250 µs with two writer connections, ~200 µs with one); reads run inline
  on the Trio thread on the read connections — WAL readers never wait for
  the writer and a read is tens of microseconds, far less than a thread
  hop (~150 µs here). SQLite allows one writer: the worker *is* that writer.
- **PostgreSQL.** Every call is network I/O, so every call runs in a worker
  thread, at most as many at once as the pools have connections.

A *moment* (:meth:`Db.write`) runs several writes in one hop: opening a
stream (account, reservation, two messages) and ending one (message,
settlement, telemetry) each cost one thread hop, not one per statement.

*Light* moments (``write(..., light=True)``: no commit in them waits for the
disk, as opening a stream's) run right on the Trio thread when the SQLite
writer is idle and this process is the file's only server: ~0.3 ms of the
loop's time instead of a thread round trip which, while the loop is busy,
waits for the GIL at every statement (measured: 500 streams opening under
load, 5-30 ms per write in the thread; see BENCHMARKS.md). The writer is
idle, so the two never hold SQLite's lock at once. The writer connections
take no automatic WAL checkpoint (which would fsync on the loop): the
batcher checkpoints every :data:`CHECKPOINT_EVERY` writes, in its thread,
from a connection of its own (light writes go on meanwhile).

Cancellation: a call that has started in its thread runs to the end (the
caller's cancellation is delivered after it returns), so nobody is ever left
not knowing whether a write happened. Errors are the backends' own
(``ledger.LedgerError``…, ``StoreUnavailable``), raised in the caller.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import outcome
import trio

import ledger
from ledger import LedgerBackend

from .storage import StoreBackend, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("chinwag.db")

#: Writes between the SQLite writer's own WAL checkpoints (light writes on).
CHECKPOINT_EVERY = 256

#: Failures a write may not meet again a moment later (:meth:`Db.write_retried`).
TRANSIENT: tuple[type[Exception], ...] = (
    sqlite3.OperationalError,
    StoreUnavailable,
    ledger.LedgerUnavailable,
)
#: Pauses between the tries of :meth:`Db.write_retried`.
RETRY_DELAYS = (0.05, 0.25, 1.0)
#: A try is made only if the caller's deadline leaves this much after the pause.
RETRY_MARGIN_S = 1.0

#: Store methods that only read (inline on SQLite).
STORE_READS = frozenset(
    {
        "user_by_name",
        "user_by_id",
        "search_users",
        "get_session",
        "session_by_key",
        "list_sessions",
        "list_messages",
        "recent_messages",
        "message_by_stream",
        "search_messages",
        "recent_telemetry",
        "schema_version",
        "ping",
    }
)
#: Ledger methods that only read (inline on SQLite).
LEDGER_READS = frozenset(
    {
        "has_account",
        "balance",
        "check",
        "open_reservations",
        "entries",
        "usage_by_model",
        "charges_for_stream",
        "verify",
        "statistics",
    }
)


class _Proxy:
    """``await proxy.method(...)``: the backend's method, run where :class:`Db` says."""

    def __init__(self, db: Db, reads: frozenset[str], reader: Any, writer: Any) -> None:
        self._db = db
        self._reads = reads
        self._reader = reader
        self._writer = writer

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in self._reads:
            method = getattr(self._reader, name)
            call = self._db._read
        else:
            method = getattr(self._writer, name)
            call = self._db._write

        @functools.wraps(method)
        async def run(*args: Any, **kwargs: Any) -> Any:
            return await call(functools.partial(method, *args, **kwargs))

        setattr(self, name, run)  # bound once per name
        return run


class _Job:
    __slots__ = ("call", "done", "result")

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.done = trio.Event()
        self.result: outcome.Outcome[Any] = outcome.Value(None)


def _run_all(batch: list[_Job]) -> None:
    """In the database thread: each write in order; an error is that write's alone."""
    for job in batch:
        job.result = outcome.capture(job.call)


class _Checkpointer:
    """Checkpoints a SQLite file's WAL from a connection of its own (one caller at a time)."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)

    def __call__(self) -> None:
        """PASSIVE: copies what no reader still needs, waits for nobody; a failure
        is logged and the next one tries again."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            log.warning("WAL checkpoint failed; tried again later", exc_info=True)

    def close(self) -> None:
        self._conn.close()


class Db:
    """The store and the ledger, awaitable (see the module docstring).

    ``store``/``ledger``: the backends the rest of the process (tests, the
    CLI) may use synchronously — for SQLite, the read connections. On
    SQLite, ``write_store``/``write_ledger`` are the worker's connections
    (opened here, closed by :meth:`close`); on PostgreSQL they are the same
    pooled objects.
    """

    def __init__(
        self,
        store: StoreBackend,
        book: LedgerBackend,
        *,
        write_store: StoreBackend | None = None,
        write_ledger: LedgerBackend | None = None,
        threads: int = 1,
        inline_reads: bool = True,
        checkpoint: _Checkpointer | None = None,
    ) -> None:
        self.store_backend = store
        self.ledger_backend = book
        self.write_store = write_store or store
        self.write_ledger = write_ledger or book
        self._owns_writers = write_store is not None
        self._inline_reads = inline_reads
        self._limiter = trio.CapacityLimiter(threads)
        # SQLite's one writer: writes queue here and the batcher hands each
        # batch to the database thread in one hop (see run()).
        self._batching = threads == 1
        self._queue: list[_Job] = []
        self._wakeup = trio.lowlevel.ParkingLot()
        self._batcher_running = False
        self._batch_in_flight = False
        # Light writes inline (see the module docstring): with the writer's own
        # WAL checkpoint, every CHECKPOINT_EVERY writes.
        self._checkpoint = checkpoint
        self._light_inline = checkpoint is not None and self._batching
        self._writes = 0
        self.store: Any = _Proxy(self, STORE_READS, store, self.write_store)
        self.ledger: Any = _Proxy(self, LEDGER_READS, book, self.write_ledger)

    @classmethod
    def open(
        cls, target: str, store: StoreBackend, book: LedgerBackend, *, shared: bool = False
    ) -> Db:
        """The Db for backends opened on ``target`` (a SQLite path or a PostgreSQL URL).

        The store and the ledger are in that one database, so one transaction
        may hold writes of both (a stream's opening: ``StoreBackend.open_turn``).
        ``shared``: other server processes write the same SQLite file (cluster
        mode), so no write runs on the loop: another process may hold the lock.
        """
        if ledger.is_postgres_url(target):
            # Each pool holds up to 10 connections; a thread per connection at most.
            return cls(store, book, threads=10, inline_reads=False)
        from .storage import open_store
        from .store import Store

        write_store = open_store(target)
        checkpoint = None
        if isinstance(write_store, Store):
            # One connection writes both: neither drops the other's page cache.
            write_ledger: LedgerBackend = ledger.SqliteLedger.sharing(write_store.conn)
            if not shared:
                # Its commits never checkpoint; the writer does (see the module docstring).
                write_store.manual_checkpoints()
                checkpoint = _Checkpointer(target)
        else:
            write_ledger = ledger.open_ledger(target)
        return cls(
            store,
            book,
            write_store=write_store,
            write_ledger=write_ledger,
            threads=1,
            checkpoint=checkpoint,
        )

    async def _read(self, call: Callable[[], T]) -> T:
        if self._inline_reads:
            return call()
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def _write(self, call: Callable[[], T]) -> T:
        if not (self._batching and self._batcher_running):
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        job = _Job(call)
        self._queue.append(job)
        self._wakeup.unpark_all()
        # Shielded: once queued the write will run; its caller learns how it went.
        with trio.CancelScope(shield=True):
            await job.done.wait()
        return job.result.unwrap()  # type: ignore[no-any-return]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The SQLite writer's batcher, for the app's life: every write queued
        while the thread was busy goes over in the next hop, in order (under
        load one hop carries many writes instead of a hop each). Each write is
        still its own transaction. Ends by cancellation, after handing over
        the batch in flight; later writes go to the thread one by one."""
        self._batcher_running = True
        task_status.started()
        try:
            while True:
                if self._checkpoint is not None and self._writes >= CHECKPOINT_EVERY:
                    # On a connection of its own, while light writes go on inline
                    # (a PASSIVE checkpoint takes no write lock).
                    self._writes = 0
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self._checkpoint, limiter=self._limiter)
                    continue
                if not self._queue:
                    await self._wakeup.park()
                    continue
                batch, self._queue = self._queue, []
                self._writes += len(batch)
                self._batch_in_flight = True
                try:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(_run_all, batch, limiter=self._limiter)
                finally:
                    self._batch_in_flight = False
                for job in batch:
                    job.done.set()
        finally:
            self._batcher_running = False
            leftover, self._queue = self._queue, []
            for job in leftover:  # queued while we were stopping: run them here
                job.result = outcome.capture(job.call)
                job.done.set()

    async def read(self, moment: Callable[..., T], *args: Any) -> T:
        """``moment(store, ledger, *args)`` where reads run (inline on SQLite)."""
        store, book = self.store_backend, self.ledger_backend
        return await self._read(lambda: moment(store, book, *args))

    async def write(self, moment: Callable[..., T], *args: Any, light: bool = False) -> T:
        """``moment(store, ledger, *args)`` in one hop to the writer, for several writes.

        Each write inside is its own transaction, as when called one by one;
        the moment only saves the hops between them. ``light``: no commit in
        it waits for the disk, so it may run right here (module docstring).
        """
        store, book = self.write_store, self.write_ledger
        if (
            light
            and self._light_inline
            and self._batcher_running
            and not self._batch_in_flight
            and not self._queue
        ):
            self._writes += 1
            if self._writes >= CHECKPOINT_EVERY:
                self._wakeup.unpark_all()  # the writer checkpoints
            return moment(store, book, *args)
        return await self._write(lambda: moment(store, book, *args))

    async def write_retried(self, moment: Callable[..., T], *args: Any) -> T:
        """:meth:`write`, tried again after a transient failure (a busy or failing
        SQLite file, an unreachable PostgreSQL) while the caller's deadline
        leaves time: :data:`RETRY_DELAYS` apart, then the last error is raised.
        Only for a moment that is one transaction (all or nothing: a call's
        ending, ``StoreBackend.close_turn``), so a failed try left nothing, or
        that is idempotent (a failed open's undo, ``StreamHub._undo_open``)."""
        for delay in (*RETRY_DELAYS, None):
            try:
                return await self.write(moment, *args)
            except TRANSIENT as exc:
                left = trio.current_effective_deadline() - trio.current_time()
                if delay is None or left < delay + RETRY_MARGIN_S:
                    raise
                name = type(exc).__name__
                log.warning("a write failed (%s); trying again in %.2f s", name, delay)
                await trio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the worker's own connections (the shared backends are the caller's)."""
        if self._owns_writers:
            self.write_store.close()
            self.write_ledger.close()
        if self._checkpoint is not None:
            self._checkpoint.close()


@contextmanager
def backends(target: str) -> Iterator[tuple[StoreBackend, LedgerBackend]]:
    """The store and the ledger at ``target`` (a SQLite path or a PostgreSQL URL),
    opened — creating or upgrading their schemas — and closed after: the CLI's
    commands, and ``serve --workers`` before its workers start."""
    from .storage import open_store

    store = open_store(target)
    try:
        with ledger.open_ledger(target) as book:
            yield store, book
    finally:
        store.close()
