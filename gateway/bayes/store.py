"""The token store: how often each token was seen in trained spam and ham.

`ITokenStore` is what the filter and the trainers use: one bulk lookup per
message (the counts of its tokens and the message totals, read together),
learning and forgetting a message, and statistics. Every call returns a
Deferred; a failed store fails it (the filter lets it fail, and the chain runner
turns that into its failure verdict).

Learning is idempotent per message, as SpamAssassin's ``bayes_seen``: the store
remembers each learned message's digest and class. Learning the same message
again as the same class changes nothing; learning it as the other class (a spam
released from the quarantine as ham) takes its tokens out of the old class
first. Forgetting takes them out.

`open_token_store(config, reactor)` opens the embedded default, a
`gateway.bayes.sqlite.SqliteTokenStore` at ``<gateway.state_dir>/bayes.sqlite``;
`MemoryTokenStore` is the fake, run through the same contract tests.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Interface, implementer

from gateway.state import StoreClosed

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = [
    "ITokenStore",
    "Learned",
    "MemoryTokenStore",
    "TokenCounts",
    "TokenStats",
    "bayes_path",
    "open_token_store",
]


class Learned(enum.Enum):
    """What learning a message did."""

    LEARNED = "learned"  # new: its tokens were counted
    ALREADY = "already"  # learned before as the same class: nothing changed
    RELEARNED = "relearned"  # learned before as the other class: moved over


@attrs.frozen
class TokenCounts:
    """The message totals and some tokens' (spam, ham) counts, read together."""

    nspam: int
    nham: int
    tokens: dict[str, tuple[int, int]] = attrs.field(factory=dict)  # only tokens ever seen


@attrs.frozen
class TokenStats:
    """What `mailgatectl bayes stats` prints."""

    nspam: int
    nham: int
    tokens: int  # distinct tokens stored
    messages: int  # digests remembered (learned messages)
    last_learned: float | None = None  # POSIX time of the last learning, if any


class ITokenStore(Interface):
    """Token counts for the Bayes classifier (module docstring)."""

    def counts(tokens: Iterable[str]) -> Deferred[TokenCounts]:
        """The totals and the counts of those of `tokens` that were ever seen."""

    def learn(digest: str, tokens: Iterable[str], spam: bool) -> Deferred[Learned]:
        """Count a message's tokens as spam or ham, once per digest (module docstring)."""

    def forget(digest: str, tokens: Iterable[str]) -> Deferred[bool]:
        """Take a learned message out again; False if it was never learned."""

    def learned(digest: str) -> Deferred[bool | None]:
        """How a message was learned: True spam, False ham, None not at all."""

    def stats() -> Deferred[TokenStats]:
        """Totals for the operator."""

    def close() -> Deferred[None]:
        """Finish the calls under way and close; later calls fail with StoreClosed."""


def bayes_path(config: Config) -> str:
    """Where the token store lives: ``<gateway.state_dir>/bayes.sqlite``."""
    return os.path.join(config.gateway.state_dir, "bayes.sqlite")


def open_token_store(config: Config, reactor: Any) -> ITokenStore:
    """The process's token store, closed with the reactor; nothing is opened until the first call."""
    from gateway.bayes.sqlite import SqliteTokenStore

    store = SqliteTokenStore(bayes_path(config), reactor)
    reactor.addSystemEventTrigger("before", "shutdown", store.close)
    return store


@implementer(ITokenStore)
class MemoryTokenStore:
    """An ITokenStore in dicts, answering at once (for tests)."""

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock
        self.tokens: dict[str, list[int]] = {}  # token -> [spam, ham]
        self.seen: dict[str, bool] = {}  # digest -> spam?
        self.nspam = 0
        self.nham = 0
        self.last_learned: float | None = None
        self.closed = False

    def counts(self, tokens: Iterable[str]) -> Deferred[TokenCounts]:
        if self.closed:
            return fail(StoreClosed("the token store is closed"))
        found = {token: (row[0], row[1]) for token in set(tokens) if (row := self.tokens.get(token))}
        return succeed(TokenCounts(self.nspam, self.nham, found))

    def learn(self, digest: str, tokens: Iterable[str], spam: bool) -> Deferred[Learned]:
        if self.closed:
            return fail(StoreClosed("the token store is closed"))
        unique = set(tokens)
        before = self.seen.get(digest)
        if before is spam:
            return succeed(Learned.ALREADY)
        if before is not None:
            self._count(unique, before, -1)
        self._count(unique, spam, +1)
        self.seen[digest] = spam
        if self.clock is not None:
            self.last_learned = self.clock.seconds()
        return succeed(Learned.LEARNED if before is None else Learned.RELEARNED)

    def forget(self, digest: str, tokens: Iterable[str]) -> Deferred[bool]:
        if self.closed:
            return fail(StoreClosed("the token store is closed"))
        before = self.seen.pop(digest, None)
        if before is None:
            return succeed(False)
        self._count(set(tokens), before, -1)
        return succeed(True)

    def learned(self, digest: str) -> Deferred[bool | None]:
        if self.closed:
            return fail(StoreClosed("the token store is closed"))
        return succeed(self.seen.get(digest))

    def stats(self) -> Deferred[TokenStats]:
        if self.closed:
            return fail(StoreClosed("the token store is closed"))
        return succeed(TokenStats(self.nspam, self.nham, len(self.tokens), len(self.seen), self.last_learned))

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def _count(self, tokens: set[str], spam: bool, step: int) -> None:
        column = 0 if spam else 1
        if spam:
            self.nspam = max(0, self.nspam + step)
        else:
            self.nham = max(0, self.nham + step)
        for token in tokens:
            row = self.tokens.setdefault(token, [0, 0])
            row[column] = max(0, row[column] + step)
            if row == [0, 0]:
                del self.tokens[token]
