"""Storage: the store seam (users, sessions, messages, telemetry) and its two backends.

::

    from server.storage import StoreBackend, open_store

    store = open_store(settings.db_path)                     # SQLite: server.store.Store
    store = open_store("postgresql://u:pw@db/chinwag")       # PostgreSQL: PostgresStore

The ledger has its own seam in the ``ledger`` package (``ledger.open_ledger``);
both may live in the same SQLite file or PostgreSQL database, each in its own
tables. See :mod:`server.storage.base` for the promise and where a Trio
caller may call each backend from. ``server.store`` stays the SQLite
store's home (and keeps re-exporting ``Page``, ``UsernameTaken``,
``now_iso``, ``search_terms``), so no import of it breaks.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ledger import is_postgres_url

from .base import MAX_SEARCH_TERMS as MAX_SEARCH_TERMS
from .base import Page as Page
from .base import SchemaTooNew as SchemaTooNew
from .base import SessionGone as SessionGone
from .base import StoreBackend as StoreBackend
from .base import StoreError as StoreError
from .base import StoreUnavailable as StoreUnavailable
from .base import UsernameTaken as UsernameTaken
from .base import now_iso as now_iso
from .base import search_terms as search_terms

if TYPE_CHECKING:
    from .postgres import PostgresStore as PostgresStore


def open_store(
    target: str | os.PathLike[str],
    *,
    max_connections: int = 10,
    pool_timeout: float = 2.0,
    connect_timeout: float = 5.0,
) -> StoreBackend:
    """The store at ``target``: PostgreSQL for ``postgresql://…``, else a SQLite file.

    Creates a missing schema, upgrades an older one, refuses a newer one
    (:class:`SchemaTooNew`). For PostgreSQL an unreachable database raises
    :class:`StoreUnavailable` naming the masked URL; the pool options mean
    nothing to SQLite.
    """
    if is_postgres_url(target):
        from .postgres import PostgresStore

        return PostgresStore(
            os.fspath(target),
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            connect_timeout=connect_timeout,
        )
    from server.store import Store  # here: server.store itself imports this package

    return Store(os.fspath(target))


def __getattr__(name: str) -> object:
    # Lazy: psycopg is imported only by a process that uses PostgreSQL.
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'server.storage' has no attribute {name!r}")
