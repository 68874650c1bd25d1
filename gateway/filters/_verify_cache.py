"""Callout answers, remembered: Postfix's verify(8) cache, in memory.

`AddressVerifier.verify(address)` answers from the cache while an answer is
fresh: a valid address for `positive_ttl`, an unknown one for `negative_ttl`
(as Postfix's address_verify_positive/negative_expire_time). An unverified
answer is not kept: the next RCPT asks again. Concurrent questions about the
same address share one callout. A RCPT waits at most `wait` seconds for its
callout; after that it is told "unverified" (the client tries again later)
while the callout goes on and its answer is cached for that retry, the way
Postfix answers "450 4.1.1 ... Address verification in progress".

The cache is bounded: past `size` entries the least recently used go first.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.filters._directory import Answer, Lookup, address_key

log = Logger(namespace="mailgate.filter.recipients")

Probe = Callable[[str], Deferred[Lookup]]


class AnswerCache:
    """Lookups by key, each until it expires; bounded, least recently used out first."""

    def __init__(self, clock: IReactorTime, size: int) -> None:
        self.clock = clock
        self.size = size
        self._entries: collections.OrderedDict[str, tuple[float, Lookup]] = collections.OrderedDict()

    def get(self, key: str) -> Lookup | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, lookup = entry
        if self.clock.seconds() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return lookup

    def put(self, key: str, lookup: Lookup, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[key] = (self.clock.seconds() + ttl, lookup)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, answer: Answer) -> int:
        """Drop every entry with this answer; how many went."""
        gone = [key for key, (_expires, lookup) in self._entries.items() if lookup.answer is answer]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)


class _Pending:
    """One callout in flight and the RCPTs waiting for it, each with its own patience."""

    def __init__(self) -> None:
        self.result: Lookup | None = None
        self.waiters: list[tuple[Deferred[Lookup], IDelayedCall | None]] = []

    def finish(self, lookup: Lookup) -> None:
        self.result = lookup
        waiters, self.waiters = self.waiters, []
        for deferred, timer in waiters:
            if timer is not None and timer.active():
                timer.cancel()
            deferred.callback(lookup)

    def give_up(self, deferred: Deferred[Lookup], lookup: Lookup) -> None:
        for entry in self.waiters:
            if entry[0] is deferred:
                self.waiters.remove(entry)
                deferred.callback(lookup)
                return


class AddressVerifier:
    """Cached, shared, patience-bounded callouts (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        probe: Probe,
        *,
        positive_ttl: float = 86400.0,
        negative_ttl: float = 3600.0,
        size: int = 100_000,
        wait: float = 8.0,
    ) -> None:
        self.clock = clock
        self.probe = probe
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.wait = wait
        self.cache = AnswerCache(clock, size)
        self._pending: dict[str, _Pending] = {}
        self.callouts = 0  # callouts started, for tests and statistics

    def verify(self, address: str) -> Lookup | Deferred[Lookup]:
        """The cached answer, or a Deferred firing with the callout's (or "in progress")."""
        key = address_key(address)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is None:
            pending = self._start(key, address)
        if pending.result is not None:  # the callout answered at once
            return pending.result
        deferred: Deferred[Lookup] = Deferred()
        timer = None
        if self.wait >= 0:
            in_progress = Lookup(Answer.UNVERIFIED, f"verification still in progress after {self.wait:g} s")
            timer = self.clock.callLater(self.wait, pending.give_up, deferred, in_progress)
        pending.waiters.append((deferred, timer))
        return deferred

    def _start(self, key: str, address: str) -> _Pending:
        pending = self._pending[key] = _Pending()
        self.callouts += 1
        try:
            answer = self.probe(address)
        except Exception:
            answer = fail()
        answer.addCallbacks(
            self._answered, self._failed, callbackArgs=(key, address), errbackArgs=(key, address)
        )
        return pending

    def _failed(self, failure: Failure, key: str, address: str) -> None:
        log.failure("recipients: callout for <{address}> failed", failure, address=address)
        self._answered(
            Lookup(Answer.UNVERIFIED, f"callout failed: {failure.getErrorMessage()}"), key, address
        )

    def _answered(self, lookup: Lookup, key: str, address: str) -> None:
        pending = self._pending.pop(key)
        if lookup.answer is Answer.VALID:
            self.cache.put(key, lookup, self.positive_ttl)
        elif lookup.answer is Answer.UNKNOWN:
            self.cache.put(key, lookup, self.negative_ttl)
        log.info(
            "recipients: callout for <{address}>: {answer} ({detail})",
            address=address,
            answer=lookup.answer.value,
            detail=lookup.detail,
        )
        pending.finish(lookup)

    def forget_unknown(self) -> int:
        """Forget the addresses found unknown (after a reload: users may have been added)."""
        return self.cache.forget(Answer.UNKNOWN)
