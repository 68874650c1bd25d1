"""The state store: what outlives a message (counters, whitelists, greylist triplets, quotas).

`IStateStore` is a small key-value store with expiry, grouped in named tables
("auto-whitelist", "greylist", "quota.messages"...), and windowed counters.
Every call returns a Deferred; a failed store fails the Deferred (a filter
lets it fail, and the chain runner turns that into its failure verdict).

`open_store(config, reactor)` opens the embedded default, a `SqliteStore` at
``<gateway.state_dir>/state.sqlite`` that every process of the gateway (the
SMTP workers and the main process) shares. `MemoryStore` is the fake; the same
contract tests run against both.

Values are JSON: strings, numbers, booleans, None, lists and dicts (a tuple
comes back as a list). Times are the clock's seconds (POSIX time in the
gateway, a `Clock` in tests).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from gateway.config import Config

__all__ = ["IStateStore", "StoreClosed", "StoreError", "open_store", "state_path"]


class StoreError(Exception):
    """The store cannot do what it was asked (cannot open the file, disk full, locked too long)."""


class StoreClosed(StoreError):
    """The store was closed (the gateway is stopping)."""


class IStateStore(Interface):
    """Named tables of expiring values and windowed counters, shared by the gateway's processes.

    A key of a table may hold a value (`get`/`put`/`add`) and a counter
    (`increment`/`count`) side by side; `delete` forgets both.
    """

    def get(table: str, key: str) -> Deferred[Any]:
        """The value stored under `key`, or None when there is none or it has expired."""

    def put(table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[None]:
        """Store `value` (JSON), replacing any; it expires `ttl` seconds from now (None: never)."""

    def add(table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[bool]:
        """Store `value` only if the key has no live value; True if this call stored it.

        Atomic across processes: of several callers at once, exactly one gets True
        (for "only the first one does X", like one alert per period).
        """

    def delete(table: str, key: str) -> Deferred[None]:
        """Forget the key's value and counter."""

    def increment(table: str, key: str, amount: int = 1, window: float | None = None) -> Deferred[int]:
        """Add `amount` to the key's counter and return its new total.

        The counter's window opens at the increment that finds it empty (or
        expired) and lasts `window` seconds (None: for ever); after it the
        count starts again from zero. Atomic across processes.
        """

    def count(table: str, key: str) -> Deferred[int]:
        """The key's counter in its current window (0 if none or expired)."""

    def expire() -> Deferred[int]:
        """Delete every expired value and counter; the number of rows deleted.

        Expired rows are never returned anyway; this only reclaims their space
        (stores also do it by themselves from time to time).
        """

    def close() -> Deferred[None]:
        """Finish the calls under way and close; later calls fail with StoreClosed."""


def state_path(config: Config) -> str:
    """Where the SQLite store lives: ``<gateway.state_dir>/state.sqlite``."""
    return os.path.join(config.gateway.state_dir, "state.sqlite")


def open_store(config: Config, reactor: Any) -> IStateStore:
    """The process's state store: SQLite under the state directory, closed with the reactor.

    Nothing is opened (no thread, no file) until the first call, so a process
    may build its filters before it forks into a daemon or drops privileges.
    """
    from gateway.state.sqlite import SqliteStore

    store = SqliteStore(state_path(config), reactor)
    reactor.addSystemEventTrigger("before", "shutdown", store.close)
    return store
