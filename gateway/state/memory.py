"""MemoryStore: an IStateStore in a dict, for tests of the filters that keep state.

It keeps the SqliteStore's rules (the same contract tests run against both):
values go through JSON (a tuple comes back a list), expired rows are never
returned, counter windows open at the first increment. Its Deferreds fire at
once. Set `failure` to an exception to make every call fail with it (a broken
store), as a filter under test must survive that.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from gateway.state import IStateStore, StoreClosed


@implementer(IStateStore)
class MemoryStore:
    """An IStateStore kept in memory, on a clock of the test's choosing."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.entries: dict[tuple[str, str], tuple[str, float | None]] = {}  # -> (JSON, expires)
        self.counters: dict[tuple[str, str], tuple[int, float | None]] = {}  # -> (count, expires)
        self.failure: Exception | None = None
        self.closed = False

    def _live(self, expires: float | None) -> bool:
        return expires is None or expires > self.clock.seconds()

    def _refused(self) -> Deferred[Any] | None:
        if self.closed:
            return fail(StoreClosed("the memory store is closed"))
        if self.failure is not None:
            return fail(self.failure)
        return None

    def get(self, table: str, key: str) -> Deferred[Any]:
        refused = self._refused()
        if refused is not None:
            return refused
        found = self.entries.get((table, key))
        if found is None or not self._live(found[1]):
            return succeed(None)
        return succeed(json.loads(found[0]))

    def put(self, table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[None]:
        refused = self._refused()
        if refused is not None:
            return refused
        self.entries[table, key] = (json.dumps(value), self._expiry(ttl))
        return succeed(None)

    def add(self, table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[bool]:
        refused = self._refused()
        if refused is not None:
            return refused
        found = self.entries.get((table, key))
        if found is not None and self._live(found[1]):
            return succeed(False)
        self.entries[table, key] = (json.dumps(value), self._expiry(ttl))
        return succeed(True)

    def delete(self, table: str, key: str) -> Deferred[None]:
        refused = self._refused()
        if refused is not None:
            return refused
        self.entries.pop((table, key), None)
        self.counters.pop((table, key), None)
        return succeed(None)

    def increment(self, table: str, key: str, amount: int = 1, window: float | None = None) -> Deferred[int]:
        refused = self._refused()
        if refused is not None:
            return refused
        found = self.counters.get((table, key))
        if found is None or not self._live(found[1]):
            found = (0, self._expiry(window))
        total = found[0] + int(amount)
        self.counters[table, key] = (total, found[1])
        return succeed(total)

    def count(self, table: str, key: str) -> Deferred[int]:
        refused = self._refused()
        if refused is not None:
            return refused
        found = self.counters.get((table, key))
        if found is None or not self._live(found[1]):
            return succeed(0)
        return succeed(found[0])

    def expire(self) -> Deferred[int]:
        refused = self._refused()
        if refused is not None:
            return refused
        dead_entries = [key for key, (_, expires) in self.entries.items() if not self._live(expires)]
        dead_counters = [key for key, (_, expires) in self.counters.items() if not self._live(expires)]
        for key in dead_entries:
            del self.entries[key]
        for key in dead_counters:
            del self.counters[key]
        return succeed(len(dead_entries) + len(dead_counters))

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def _expiry(self, seconds: float | None) -> float | None:
        return None if seconds is None else self.clock.seconds() + seconds
