"""Seen UIDs: which messages of an external mailbox are already in our queue.

One set per (account, folder), on the state store (table "fetch.seen"), as
``{uid: first_seen_time}``. The poller records a UID only once the message
is durable in the spool (the reception answered 250), so:

- a crash or a dropped connection before that leaves the message unrecorded,
  and the next poll fetches it (again, if it was the one in flight: at most
  one duplicate, never a loss);
- a restart reads the set back and fetches nothing already queued.

Writing the whole set for every message would cost O(n) per message on a
large kept mailbox, so each record goes to a small journal value beside it
(``<key>\\tnew``), folded into the set at the end of a poll and every
`JOURNAL_LIMIT` records; reading merges the two. The set is pruned of UIDs
the server no longer lists after each listing, so its size (memory and
store) is bounded by what is on the server: about 40 bytes a message, some
4 MB for a kept mailbox of 100,000 messages. IMAP UIDs carry their
UIDVALIDITY ("<validity>:<uid>"), so a new UIDVALIDITY makes every message
new and prunes the old ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from gateway.state import IStateStore

__all__ = ["JOURNAL_LIMIT", "TABLE", "SeenStore", "SeenUids"]

TABLE = "fetch.seen"
JOURNAL_LIMIT = 256  # records kept in the journal before the set is rewritten


class SeenUids:
    """The seen UIDs of one mailbox (account and folder), in memory with the store behind."""

    def __init__(
        self,
        store: IStateStore,
        key: str,
        clock: IReactorTime,
        uids: dict[str, float],
        journal: dict[str, float] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.clock = clock
        self.uids = uids
        self.journal: dict[str, float] = dict(journal or {})  # stored beside, not yet in the set

    def __contains__(self, uid: object) -> bool:
        return uid in self.uids

    def __len__(self) -> int:
        return len(self.uids)

    def first_seen(self, uid: str) -> float | None:
        return self.uids.get(uid)

    def record(self, uid: str) -> Deferred[None]:
        """Remember `uid` (its message is durable in the spool); fires once the store has it."""
        now = self.clock.seconds()
        self.uids.setdefault(uid, now)
        self.journal[uid] = self.uids[uid]
        if len(self.journal) >= JOURNAL_LIMIT:
            return self.flush()
        return self.store.put(TABLE, self.key + "\tnew", dict(self.journal))

    def prune(self, listed: Iterable[str]) -> int:
        """Forget UIDs the server no longer lists; how many were forgotten (stored at `flush`)."""
        present = set(listed)
        gone = [uid for uid in self.uids if uid not in present]
        for uid in gone:
            del self.uids[uid]
            self.journal.pop(uid, None)
        return len(gone)

    def flush(self) -> Deferred[None]:
        """Write the whole set, then empty the journal (a crash between: the merge is the same)."""
        written = self.store.put(TABLE, self.key, dict(self.uids))

        def clear(_: None) -> Deferred[None]:
            self.journal = {}
            return self.store.delete(TABLE, self.key + "\tnew")

        return written.addCallback(clear)


class SeenStore:
    """The seen-UID sets of every account, loaded once from the state store and kept."""

    def __init__(self, store: IStateStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock
        self._open: dict[str, SeenUids] = {}

    @staticmethod
    def key(account: str, folder: str) -> str:
        return f"{account}\t{folder}"  # account names have no white space

    def open(self, account: str, folder: str) -> Deferred[SeenUids]:
        """The account's folder's set (read from the store the first time)."""
        key = self.key(account, folder)
        if key in self._open:
            return succeed(self._open[key])

        async def load() -> SeenUids:
            base = await self.store.get(TABLE, key)
            journal = _uids(await self.store.get(TABLE, key + "\tnew"))
            uids = _uids(base)
            uids.update(journal)
            return self._open.setdefault(key, SeenUids(self.store, key, self.clock, uids, journal))

        return Deferred.fromCoroutine(load())

    def forget(self, account: str) -> None:
        """Drop the cached sets of an account (the store keeps them)."""
        for key in [k for k in self._open if k.partition("\t")[0] == account]:
            del self._open[key]


def _uids(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(uid): float(seen) for uid, seen in value.items() if isinstance(seen, (int, float))}
