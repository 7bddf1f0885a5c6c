"""The ledger's seam: :class:`LedgerBackend` (both backends implement it), :func:`open_ledger`.

The server holds a ``LedgerBackend`` and never asks which one it is. Every
method is synchronous and each is one transaction (see :mod:`ledger.core`
for the promise, :mod:`ledger.sqlite` and :mod:`ledger.postgres` for how
each engine keeps it and where a Trio caller may call it from).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from .urls import is_postgres_url
from .values import Balance, Entry, LedgerStatistics, Reservation, Settlement

__all__ = ["LedgerBackend", "open_ledger"]


@runtime_checkable
class LedgerBackend(Protocol):
    """Accounts, reservations and entries; what ``ledger.Ledger`` (SQLite) and
    ``ledger.PostgresLedger`` both offer, with the same arguments, return values
    and errors (PostgreSQL adds :class:`~ledger.LedgerUnavailable`)."""

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def open_account(self, account_id: str) -> Balance: ...

    def has_account(self, account_id: str) -> bool: ...

    def balance(self, account_id: str) -> Balance: ...

    def check(self, account_id: str, required: int) -> tuple[bool, int]: ...

    def allocate(
        self,
        account_id: str,
        credits: int,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Balance: ...

    def refund(
        self,
        account_id: str,
        credits: int,
        *,
        reason: str | None = None,
        streaming_session_id: str | None = None,
    ) -> Entry: ...

    def reserve(
        self,
        account_id: str,
        credits: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        holder: str | None = None,
    ) -> Reservation: ...

    def reservation(
        self,
        account_id: str,
        credits: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        holder: str | None = None,
    ) -> Callable[[Any], Reservation]: ...

    def settle(
        self,
        reservation_id: str,
        charge: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Settlement: ...

    def settlement(
        self,
        reservation_id: str,
        charge: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Callable[[Any], Settlement]: ...

    def release(self, reservation_id: str) -> None: ...

    def open_reservations(self, account_id: str | None = None) -> list[Reservation]: ...

    def recover(self, holder: str | None = None) -> int: ...

    def entries(
        self, account_id: str, *, offset: int = 0, limit: int = 20
    ) -> tuple[list[Entry], int]: ...

    def usage_by_model(self, account_id: str) -> dict[str, int]: ...

    def charges_for_stream(self, streaming_session_id: str) -> int: ...

    def verify(self) -> list[str]: ...

    def statistics(self) -> LedgerStatistics: ...


def open_ledger(
    target: str | os.PathLike[str],
    *,
    max_connections: int = 10,
    pool_timeout: float = 2.0,
    connect_timeout: float = 5.0,
) -> LedgerBackend:
    """The ledger at ``target``: PostgreSQL for ``postgresql://…``, else a SQLite file.

    Creates a missing schema, upgrades an older one, and refuses a newer one
    (:class:`~ledger.SchemaTooNew`). For PostgreSQL, ``max_connections``
    bounds its pool, ``pool_timeout`` is how long a call waits for a pooled
    connection before :class:`~ledger.LedgerUnavailable`, and an unreachable
    database at open raises :class:`~ledger.LedgerUnavailable` naming the
    masked URL; the pool options mean nothing to SQLite.
    """
    if is_postgres_url(target):
        from .postgres import PostgresLedger

        return PostgresLedger(
            os.fspath(target),
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            connect_timeout=connect_timeout,
        )
    from .sqlite import SqliteLedger

    return SqliteLedger(target)
