"""The token store in one SQLite file: `TokenDatabase` (blocking) and `SqliteTokenStore` (Deferreds).

`TokenDatabase` is the file and its queries, called directly by the command line
(``mailgatectl bayes train`` trains in its own process, as ``sa-learn`` does).
`SqliteTokenStore` is the gateway's ITokenStore over it: one connection used by
one thread of its own, never the reactor's thread nor its shared pool (a slow
disk must not stop SMTP sessions), results brought back with ``callFromThread``.

The gateway's processes and a training command may use the file at once: WAL
lets readers go on while one writes, writers take the lock up front
(``BEGIN IMMEDIATE``) and wait for it up to `busy_timeout`. A message is
learned in one transaction with its totals, so a reader never sees tokens
counted for a message the totals do not count.

The schema carries a version (``PRAGMA user_version``); a file from a newer
MailGate is refused.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.bayes.store import ITokenStore, Learned, TokenCounts, TokenStats
from gateway.state import StoreClosed, StoreError

T = TypeVar("T")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE tokens (token TEXT PRIMARY KEY, spam INTEGER NOT NULL, ham INTEGER NOT NULL)"
        " WITHOUT ROWID",
        "CREATE TABLE seen (digest TEXT PRIMARY KEY, spam INTEGER NOT NULL, learned REAL NOT NULL)"
        " WITHOUT ROWID",
        "CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), nspam INTEGER NOT NULL,"
        " nham INTEGER NOT NULL, last_learned REAL)",
        "INSERT INTO totals VALUES (0, 0, 0, NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
_CHUNK = 500  # tokens per IN (...) query: well under SQLite's limit on parameters

_ADD = (
    "INSERT INTO tokens (token, spam, ham) VALUES (?, ?, ?) ON CONFLICT (token) DO UPDATE"
    " SET spam = spam + excluded.spam, ham = ham + excluded.ham"
)
_SUBTRACT_SPAM = "UPDATE tokens SET spam = MAX(spam - 1, 0) WHERE token = ?"
_SUBTRACT_HAM = "UPDATE tokens SET ham = MAX(ham - 1, 0) WHERE token = ?"


class TokenDatabase:
    """The token store's file, used from one thread at a time (module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            self.connection = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the Bayes token store {path}: {error}") from error
        try:
            self.connection.execute("PRAGMA journal_mode = WAL")
            # a crash of the process loses nothing committed; a power loss may lose the last few
            self.connection.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as error:
            self.connection.close()
            raise StoreError(f"cannot open the Bayes token store {path}: {error}") from error
        except BaseException:
            self.connection.close()
            raise

    def close(self) -> None:
        self.connection.close()

    # --- reading -----------------------------------------------------------------

    def counts(self, tokens: Iterable[str]) -> TokenCounts:
        wanted = sorted(set(tokens))
        with self._transaction(writes=False):
            nspam, nham = self.connection.execute("SELECT nspam, nham FROM totals").fetchone()
            found: dict[str, tuple[int, int]] = {}
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for token, spam, ham in self.connection.execute(
                    f"SELECT token, spam, ham FROM tokens WHERE token IN ({marks})", chunk
                ):
                    found[token] = (int(spam), int(ham))
        return TokenCounts(int(nspam), int(nham), found)

    def learned(self, digest: str) -> bool | None:
        with self._transaction(writes=False):
            row = self.connection.execute("SELECT spam FROM seen WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else bool(row[0])

    def stats(self) -> TokenStats:
        with self._transaction(writes=False):
            nspam, nham, last = self.connection.execute(
                "SELECT nspam, nham, last_learned FROM totals"
            ).fetchone()
            (tokens,) = self.connection.execute("SELECT COUNT(*) FROM tokens").fetchone()
            (messages,) = self.connection.execute("SELECT COUNT(*) FROM seen").fetchone()
        return TokenStats(int(nspam), int(nham), int(tokens), int(messages), last)

    # --- learning ----------------------------------------------------------------

    def learn(self, digest: str, tokens: Iterable[str], spam: bool, now: float | None = None) -> Learned:
        return self.learn_many([(digest, tokens, spam)], now)[0]

    def learn_many(
        self, messages: Sequence[tuple[str, Iterable[str], bool]], now: float | None = None
    ) -> list[Learned]:
        """Learn several messages in one transaction (the command line trains in batches)."""
        when = time.time() if now is None else now
        results = []
        with self._transaction(writes=True):
            for digest, tokens, spam in messages:
                results.append(self._learn(digest, set(tokens), spam, when))
        return results

    def forget(self, digest: str, tokens: Iterable[str]) -> bool:
        with self._transaction(writes=True):
            row = self.connection.execute("SELECT spam FROM seen WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                return False
            self._uncount(set(tokens), bool(row[0]))
            self.connection.execute("DELETE FROM seen WHERE digest = ?", (digest,))
        return True

    def _learn(self, digest: str, tokens: set[str], spam: bool, now: float) -> Learned:
        row = self.connection.execute("SELECT spam FROM seen WHERE digest = ?", (digest,)).fetchone()
        if row is not None and bool(row[0]) is spam:
            return Learned.ALREADY
        if row is not None:
            self._uncount(tokens, bool(row[0]))
        one = (1, 0) if spam else (0, 1)
        self.connection.executemany(_ADD, ((token, *one) for token in tokens))
        column = "nspam" if spam else "nham"
        self.connection.execute(f"UPDATE totals SET {column} = {column} + 1, last_learned = ?", (now,))
        self.connection.execute(
            "INSERT INTO seen (digest, spam, learned) VALUES (?, ?, ?) ON CONFLICT (digest) DO UPDATE"
            " SET spam = excluded.spam, learned = excluded.learned",
            (digest, int(spam), now),
        )
        return Learned.LEARNED if row is None else Learned.RELEARNED

    def _uncount(self, tokens: set[str], spam: bool) -> None:
        self.connection.executemany(_SUBTRACT_SPAM if spam else _SUBTRACT_HAM, ((t,) for t in tokens))
        self.connection.execute("DELETE FROM tokens WHERE spam = 0 AND ham = 0")
        column = "nspam" if spam else "nham"
        self.connection.execute(f"UPDATE totals SET {column} = MAX({column} - 1, 0)")

    # --- the file ----------------------------------------------------------------

    def _transaction(self, *, writes: bool) -> _Transaction:
        return _Transaction(self.connection, writes, self.path)

    def _migrate(self) -> None:
        if _version(self.connection) == SCHEMA_VERSION:
            return
        with self._transaction(writes=True):  # another process may be creating it right now
            version = _version(self.connection)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this MailGate knows "
                    f"({SCHEMA_VERSION}): it was written by a newer MailGate"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    self.connection.execute(statement)
            self.connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class _Transaction:
    """BEGIN (IMMEDIATE for writers) ... COMMIT, or ROLLBACK on an error; sqlite errors as StoreError."""

    def __init__(self, connection: sqlite3.Connection, writes: bool, path: str) -> None:
        self.connection = connection
        self.writes = writes
        self.path = path

    def __enter__(self) -> None:
        try:
            # a writer takes the lock up front: a read lock upgraded later cannot wait for it
            self.connection.execute("BEGIN IMMEDIATE" if self.writes else "BEGIN")
        except sqlite3.Error as error:
            raise StoreError(f"the Bayes token store {self.path} is busy or broken: {error}") from error

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if error is None:
            try:
                self.connection.execute("COMMIT")
                return
            except sqlite3.Error as failure:
                error = failure
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")
        if isinstance(error, sqlite3.Error):
            raise StoreError(f"the Bayes token store {self.path}: {error}") from error


def _version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


@implementer(ITokenStore)
class SqliteTokenStore:
    """An ITokenStore over a `TokenDatabase` in a thread of its own (module docstring).

    Nothing happens until the first call: then the thread starts and opens the
    file (creating it). A file that cannot be opened fails that call; the next
    call tries again.
    """

    def __init__(self, path: str, reactor: Any, *, clock: Any = None, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.busy_timeout = busy_timeout
        self._jobs: queue.SimpleQueue[tuple[Callable[[TokenDatabase], Any], Deferred[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self._close_waiters: list[Deferred[None]] = []

    def counts(self, tokens: Iterable[str]) -> Deferred[TokenCounts]:
        wanted = list(tokens)
        return self._submit(lambda database: database.counts(wanted))

    def learn(self, digest: str, tokens: Iterable[str], spam: bool) -> Deferred[Learned]:
        unique, now = set(tokens), self.clock.seconds()
        return self._submit(lambda database: database.learn(digest, unique, spam, now))

    def forget(self, digest: str, tokens: Iterable[str]) -> Deferred[bool]:
        unique = set(tokens)
        return self._submit(lambda database: database.forget(digest, unique))

    def learned(self, digest: str) -> Deferred[bool | None]:
        return self._submit(lambda database: database.learned(digest))

    def stats(self) -> Deferred[TokenStats]:
        return self._submit(lambda database: database.stats())

    def close(self) -> Deferred[None]:
        self._closing = True
        if self._thread is None or self._stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if not self._close_waiters:
            self._jobs.put(None)  # the thread finishes what is queued before it, then stops
        self._close_waiters.append(waiter)
        return waiter

    def _submit(self, run: Callable[[TokenDatabase], T]) -> Deferred[T]:
        if self._closing:
            return fail(StoreClosed(f"the Bayes token store {self.path} is closed"))
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"bayes-store {self.path}", daemon=True)
            self._thread.start()
        deferred: Deferred[T] = Deferred()
        self._jobs.put((run, deferred))
        return deferred

    def _serve(self) -> None:
        database: TokenDatabase | None = None
        while (job := self._jobs.get()) is not None:
            run, deferred = job
            try:
                if database is None:
                    database = TokenDatabase(self.path, busy_timeout=self.busy_timeout)
                result = run(database)
            except Exception as error:
                problem = Failure(_store_error(self.path, error))  # type: ignore[no-untyped-call]
                self.reactor.callFromThread(deferred.errback, problem)
            else:
                self.reactor.callFromThread(deferred.callback, result)
        if database is not None:
            database.close()
        self.reactor.callFromThread(self._done)

    def _done(self) -> None:
        self._stopped = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _store_error(path: str, error: Exception) -> Exception:
    """OS and SQLite errors as a StoreError naming the file; anything else (a bug) as it is."""
    if isinstance(error, (sqlite3.Error, OSError)):
        wrapped = StoreError(f"the Bayes token store {path}: {error}")
        wrapped.__cause__ = error
        return wrapped
    return error
