"""One PostgreSQL connection policy, shared by the ledger and the server's store.

:class:`PostgresPool` wraps a bounded :class:`psycopg_pool.ConnectionPool`
of synchronous, autocommit connections and runs units of work on it. It is
the one place where psycopg's connection-level errors are interpreted; each
caller passes its own ``unavailable`` error class, so the ledger raises
:class:`~ledger.LedgerUnavailable` and the store its own.

Guarantees of :meth:`PostgresPool.run`:

* **Bounded waits.** A call waits at most ``timeout`` seconds for a pooled
  connection (all busy, or the database unreachable), then raises
  ``unavailable`` — never hangs. A row lock is waited for at most
  ``lock_timeout`` (the session's ``lock_timeout``); a session left idle
  inside a transaction is ended by the server after 60 s.
* **Nothing half-written.** A unit is one transaction (``BEGIN … COMMIT``)
  or one autocommit statement. One that fails before ``COMMIT`` is rolled
  back (PostgreSQL rolls back by itself a transaction whose connection
  died). Only a connection cut with no answer from the server *during*
  ``COMMIT`` (or during a lone autocommit write) leaves the outcome unknown,
  and the error says so: the change is then wholly applied or wholly absent.
* **Recovery without a restart.** An idle pooled connection whose socket
  has something to read (the server's goodbye after a restart or
  ``pg_terminate_backend``) is pinged before use and replaced if dead, with
  every dead idle sibling — zero round trips when nothing is wrong. A unit
  whose connection fails anyway is run once more on a fresh connection
  when nothing of it can have been applied (see :meth:`PostgresPool.run`).
  The pool replaces discarded connections in the background and reconnects
  when the database is back.
* **No password in any message.** Errors and the ``url`` attribute name the
  database by :func:`~ledger.urls.mask_url`; driver messages are scrubbed.

Every method blocks its calling thread for network round trips: from Trio,
call through ``trio.to_thread.run_sync`` with a ``CapacityLimiter`` no
larger than ``max_size`` (more threads would only queue on the pool).
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .urls import InvalidDatabaseUrl, mask_url, scrub

__all__ = ["Connection", "PostgresPool"]

T = TypeVar("T")
log = logging.getLogger("chinwag.storage.postgres")
Connection = psycopg.Connection[Any]

# Errors that mean "this connection, or the server behind it, failed us" (not our SQL).
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000


class PostgresPool:
    """A bounded pool of autocommit connections to one PostgreSQL database.

    ``url`` (the attribute) is the masked URL. Open it with :meth:`open`,
    which first connects once directly so that an unreachable database is a
    clear error at start-up, not a timeout later.
    """

    def __init__(
        self,
        url: str,
        *,
        what: str,
        unavailable: Callable[[str], Exception],
        application_name: str,
        max_size: int = 10,
        timeout: float = 2.0,
        connect_timeout: float = 5.0,
        lock_timeout: float = 5.0,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.url = mask_url(url)
        self.what = what
        self.max_size = max_size
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self._raw_url = url
        self._unavailable = unavailable
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise InvalidDatabaseUrl(
                f"invalid database URL {self.url}: {self._scrub(exc)}"
            ) from None
        options = " ".join(
            part
            for part in (
                str(params.get("options") or ""),
                f"-c lock_timeout={max(1, round(lock_timeout * 1000))}",
                f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}",
            )
            if part
        )
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(connect_timeout)),
            "options": options,
            # A peer that vanished without a FIN is noticed within ~30 s.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 4,
        }
        if "application_name" not in params:
            self._kwargs["application_name"] = application_name
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            kwargs=self._kwargs,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=timeout,
            name=application_name,
        )

    # -- lifecycle -------------------------------------------------------------------

    def open(self, first_use: Callable[[Connection], None] | None = None) -> None:
        """Connect once, run ``first_use`` on that connection (migrations), open the pool.

        An unreachable database, a wrong password or a missing database raises
        ``unavailable`` with the driver's reason and the masked URL.
        """
        try:
            conn = psycopg.connect(self._raw_url, **self._kwargs)
        except psycopg.Error as exc:
            raise self._unavailable(
                f"cannot connect to {self.what} at {self.url}: {self._scrub(exc)}"
            ) from self._cause(exc)
        try:
            if first_use is not None:
                try:
                    first_use(conn)
                except _CONNECTION_ERRORS as exc:
                    raise self._unavailable(
                        f"lost {self.what} at {self.url} while opening: {self._scrub(exc)}"
                    ) from self._cause(exc)
        finally:
            conn.close()
        self._pool.open(wait=False)

    def close(self) -> None:
        """Close every connection. Idempotent."""
        self._pool.close()

    @property
    def closed(self) -> bool:
        return self._pool.closed

    # -- units of work ---------------------------------------------------------------

    def run(self, work: Callable[[Connection], T], *, begin: str | None, idempotent: bool) -> T:
        """Run ``work(conn)`` on a pooled connection and return its result.

        ``begin`` (e.g. ``"BEGIN"``) makes the unit one transaction, committed
        when ``work`` returns and rolled back when it raises. ``begin=None``
        runs in autocommit: then ``work`` is reads only (``idempotent=True``)
        or exactly one writing statement, atomic by itself.

        When the connection fails, the unit is run once more on another
        connection if it is known that nothing of it was applied: it failed
        before ``COMMIT`` was sent, or the server itself answered with the
        error (a server that committed says so before it dies); so is a
        deadlock or serialisation victim, and any ``idempotent`` unit.
        Otherwise — a second failure, a lock not granted in time, a
        connection cut with no answer during ``COMMIT`` or a lone autocommit
        write — it raises ``unavailable``, whose message says whether
        nothing was committed or the change was applied wholly or not at all.
        ``work`` must therefore have no effect outside the database.
        """
        for attempt in (1, 2):
            conn = self._getconn()
            phase = "begin"
            try:
                if begin is not None:
                    conn.execute(begin)
                phase = "work"
                result = work(conn)
                if begin is not None:
                    phase = "commit"
                    conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if begin is not None and phase == "work":
                    _rollback_quietly(conn)
                if not isinstance(exc, _CONNECTION_ERRORS):
                    raise
                nothing_applied = (
                    phase == "begin"
                    or (phase == "work" and begin is not None)
                    or not _unanswered(exc)
                )
                if attempt == 1 and (
                    isinstance(exc, psycopg.errors.TransactionRollback)
                    or (_is_dead(conn) and (idempotent or nothing_applied))
                ):
                    self._retrying(exc)
                    continue
                unknown = not idempotent and not nothing_applied
                raise self._failed(exc, outcome_unknown=unknown) from self._cause(exc)
            finally:
                self._pool.putconn(conn)
                if attempt == 1 and _is_dead(conn):
                    # Its idle siblings likely died with it (a server restart).
                    self._pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- internals -------------------------------------------------------------------

    def _getconn(self) -> Connection:
        """A pooled connection that has not visibly died while idle.

        Zero round trips in the common case: an idle connection has nothing to
        read, so a socket that is readable means the server said something
        unprompted — usually goodbye (``pg_terminate_backend``, a restart) —
        and only then is the connection pinged. A dead one is dropped with
        every other dead idle connection (:meth:`ConnectionPool.check`) and
        another is taken; nothing of the caller's work has been sent yet.
        """
        conn = self._checkout()
        if not _went_away(conn):
            return conn
        self._pool.putconn(conn)
        log.warning("%s at %s: a pooled connection had died; replacing it", self.what, self.url)
        self._pool.check()
        conn = self._checkout()
        if _went_away(conn):
            self._pool.putconn(conn)
            raise self._unavailable(f"{self.what} at {self.url} keeps dropping connections")
        return conn

    def _checkout(self) -> Connection:
        try:
            return self._pool.getconn()
        except PoolTimeout:
            raise self._unavailable(
                f"no connection to {self.what} at {self.url} within {self.timeout:g} s:"
                f" all {self.max_size} pooled connections are busy, or the database"
                " is unreachable"
            ) from None
        except PoolClosed:
            raise self._unavailable(f"{self.what} at {self.url} is closed") from None

    def _retrying(self, exc: BaseException) -> None:
        log.warning(
            "%s at %s: %s; nothing was applied, retrying once",
            self.what,
            self.url,
            self._scrub(exc),
        )

    def _failed(self, exc: BaseException, *, outcome_unknown: bool = False) -> Exception:
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return self._unavailable(
                f"{self.what} at {self.url} is busy: a row lock was not granted within"
                f" {self.lock_timeout:g} s; nothing was committed"
            )
        outcome = (
            "the change was applied wholly or not at all"
            if outcome_unknown
            else "nothing was committed"
        )
        return self._unavailable(f"{self.what} at {self.url} failed: {self._scrub(exc)}; {outcome}")

    def _cause(self, exc: BaseException) -> BaseException | None:
        """``exc`` to chain as ``__cause__``, unless its text would reveal the password."""
        return None if scrub(str(exc), self._raw_url) != str(exc) else exc

    def _scrub(self, exc: BaseException) -> str:
        message = " ".join(str(exc).split()) or type(exc).__name__
        return scrub(message, self._raw_url)


def _is_dead(conn: Connection) -> bool:
    return conn.broken or conn.closed


def _unanswered(exc: BaseException) -> bool:
    """True when the connection broke without the server answering the statement.

    An error the server reports (it has a SQLSTATE, e.g. ``57P01`` from
    ``pg_terminate_backend``) means that statement, and an autocommit
    statement's or a COMMIT's transaction, did not commit: a server answers
    a committed statement with success before it dies. Only a connection cut
    without an answer leaves the outcome unknown.
    """
    return getattr(exc, "sqlstate", None) is None


def _went_away(conn: Connection) -> bool:
    """Whether an idle pooled connection is dead (a ping only if it has unread input)."""
    if _is_dead(conn):
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    try:
        conn.execute("")  # reads what arrived: a notice, or the server's goodbye
    except psycopg.Error:
        return True
    return False


def _rollback_quietly(conn: Connection) -> None:
    if _is_dead(conn):
        return  # the server rolled it back when the connection died
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()  # the pool discards it
