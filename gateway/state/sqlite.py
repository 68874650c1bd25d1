"""SqliteStore: the state store in one SQLite file, shared by the gateway's processes.

Each process has one connection, used by one thread of its own: never the
reactor's thread (a locked or slow disk must not stop the SMTP sessions) and
never the reactor's shared thread pool (DNS and the spool live there). Calls
are queued to that thread; what is queued when it wakes runs as one
transaction (one commit for a burst of counter updates), each call in a
savepoint of its own so one bad call does not spoil the others. Results come
back to the reactor with ``callFromThread``.

Several processes (the SMTP workers and the main process) share the file: WAL
mode lets readers go on while one writes, writes take the lock up front
(``BEGIN IMMEDIATE``) and wait for it up to `busy_timeout`, and counters are
updated in one statement, so they are atomic across processes.

The schema carries a version (``PRAGMA user_version``); opening a file of an
older version migrates it, and a file from a newer MailGate is refused.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.state import IStateStore, StoreClosed, StoreError

log = Logger(namespace="mailgate.state")

# MIGRATIONS[n] takes a file from version n to n + 1
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE entries (tbl TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
        " expires REAL, PRIMARY KEY (tbl, key)) WITHOUT ROWID",
        "CREATE INDEX entries_expires ON entries (expires) WHERE expires IS NOT NULL",
        "CREATE TABLE counters (tbl TEXT NOT NULL, key TEXT NOT NULL, count INTEGER NOT NULL,"
        " expires REAL, PRIMARY KEY (tbl, key)) WITHOUT ROWID",
        "CREATE INDEX counters_expires ON counters (expires) WHERE expires IS NOT NULL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_LIVE = "(expires IS NULL OR expires > :now)"
_GET = f"SELECT value FROM entries WHERE tbl = :tbl AND key = :key AND {_LIVE}"
_PUT = (
    "INSERT INTO entries (tbl, key, value, expires) VALUES (:tbl, :key, :value, :expires)"
    " ON CONFLICT (tbl, key) DO UPDATE SET value = excluded.value, expires = excluded.expires"
)
_ADD = _PUT + " WHERE entries.expires IS NOT NULL AND entries.expires <= :now"
_COUNT = f"SELECT count FROM counters WHERE tbl = :tbl AND key = :key AND {_LIVE}"
_STALE = "(counters.expires IS NOT NULL AND counters.expires <= :now)"
_INCREMENT = (
    "INSERT INTO counters (tbl, key, count, expires) VALUES (:tbl, :key, :amount, :expires)"
    " ON CONFLICT (tbl, key) DO UPDATE SET"
    f" count = CASE WHEN {_STALE} THEN excluded.count ELSE counters.count + excluded.count END,"
    f" expires = CASE WHEN {_STALE} THEN excluded.expires ELSE counters.expires END"
    " RETURNING count"
)

Operation = Callable[[sqlite3.Connection], Any]


class _Job:
    """One call waiting for the store's thread."""

    __slots__ = ("deferred", "run", "writes")

    def __init__(self, run: Operation, writes: bool, deferred: Deferred[Any]) -> None:
        self.run = run
        self.writes = writes
        self.deferred = deferred


@implementer(IStateStore)
class SqliteStore:
    """An IStateStore in a SQLite file (see the module docstring).

    `reactor` brings results back (``callFromThread``); `clock` says what time
    it is (the reactor unless given). Nothing happens until the first call:
    then the thread starts and opens, creates or migrates the file.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        *,
        clock: IReactorTime | None = None,
        busy_timeout: float = 10.0,
        expire_interval: float = 600.0,
        max_batch: int = 500,
    ) -> None:
        self.path = path
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.busy_timeout = busy_timeout
        self.expire_interval = expire_interval
        self.max_batch = max_batch
        self.transactions = 0  # batches committed (read by tests and statistics)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self._close_waiters: list[Deferred[None]] = []
        self._next_expiry: float | None = None

    # --- IStateStore -----------------------------------------------------------------

    def get(self, table: str, key: str) -> Deferred[Any]:
        params = {"tbl": table, "key": key, "now": self.clock.seconds()}

        def run(connection: sqlite3.Connection) -> Any:
            row = connection.execute(_GET, params).fetchone()
            return None if row is None else json.loads(row[0])

        return self._submit(run, writes=False)

    def put(self, table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[None]:
        params = self._entry(table, key, value, ttl)

        def run(connection: sqlite3.Connection) -> None:
            connection.execute(_PUT, params)

        return self._submit(run, writes=True)

    def add(self, table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[bool]:
        params = self._entry(table, key, value, ttl)

        def run(connection: sqlite3.Connection) -> bool:
            return connection.execute(_ADD, params).rowcount == 1

        return self._submit(run, writes=True)

    def delete(self, table: str, key: str) -> Deferred[None]:
        params = {"tbl": table, "key": key}

        def run(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM entries WHERE tbl = :tbl AND key = :key", params)
            connection.execute("DELETE FROM counters WHERE tbl = :tbl AND key = :key", params)

        return self._submit(run, writes=True)

    def increment(self, table: str, key: str, amount: int = 1, window: float | None = None) -> Deferred[int]:
        now = self.clock.seconds()
        params = {
            "tbl": table,
            "key": key,
            "amount": int(amount),
            "now": now,
            "expires": None if window is None else now + window,
        }

        def run(connection: sqlite3.Connection) -> int:
            row = connection.execute(_INCREMENT, params).fetchone()
            return int(row[0])

        return self._submit(run, writes=True)

    def count(self, table: str, key: str) -> Deferred[int]:
        params = {"tbl": table, "key": key, "now": self.clock.seconds()}

        def run(connection: sqlite3.Connection) -> int:
            row = connection.execute(_COUNT, params).fetchone()
            return 0 if row is None else int(row[0])

        return self._submit(run, writes=False)

    def expire(self) -> Deferred[int]:
        return self._submit(self._expire_operation(), writes=True)

    def close(self) -> Deferred[None]:
        self._closing = True
        if self._thread is None or self._stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if not self._close_waiters:
            self._jobs.put(None)  # the thread finishes what is queued before it, then stops
        self._close_waiters.append(waiter)
        return waiter

    # --- the reactor's side --------------------------------------------------------

    def _entry(self, table: str, key: str, value: Any, ttl: float | None) -> dict[str, Any]:
        now = self.clock.seconds()
        return {
            "tbl": table,
            "key": key,
            "value": json.dumps(value, separators=(",", ":")),
            "expires": None if ttl is None else now + ttl,
            "now": now,
        }

    def _expire_operation(self) -> Operation:
        params = {"now": self.clock.seconds()}

        def run(connection: sqlite3.Connection) -> int:
            deleted = connection.execute("DELETE FROM entries WHERE expires <= :now", params).rowcount
            deleted += connection.execute("DELETE FROM counters WHERE expires <= :now", params).rowcount
            return int(deleted)

        return run

    def _submit(self, run: Operation, *, writes: bool) -> Deferred[Any]:
        if self._closing:
            return fail(StoreClosed(f"the state store {self.path} is closed"))
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"state-store {self.path}", daemon=True)
            self._thread.start()
        self._expire_now_and_then()
        deferred: Deferred[Any] = Deferred()
        self._jobs.put(_Job(run, writes, deferred))
        return deferred

    def _expire_now_and_then(self) -> None:
        """Reclaim expired rows at the first call and every `expire_interval` after."""
        now = self.clock.seconds()
        if self._next_expiry is not None and now < self._next_expiry:
            return
        self._next_expiry = now + self.expire_interval
        expired: Deferred[int] = Deferred()
        expired.addErrback(
            lambda failure: log.warn(
                "state store: expiring old rows failed: {error}", error=failure.getErrorMessage()
            )
        )
        self._jobs.put(_Job(self._expire_operation(), True, expired))

    def _fire(self, deferred: Deferred[Any], ok: bool, value: Any) -> None:
        if ok:
            deferred.callback(value)
        else:
            deferred.errback(Failure(value))  # type: ignore[no-untyped-call]

    def _done(self) -> None:
        self._stopped = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # --- the store's thread --------------------------------------------------------

    def _serve(self) -> None:
        connection: sqlite3.Connection | None = None
        stopping = False
        while not stopping:
            batch: list[_Job] = []
            job = self._jobs.get()
            while True:
                if job is None:
                    stopping = True
                else:
                    batch.append(job)
                if len(batch) >= self.max_batch:
                    break
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if not batch:
                continue
            if connection is None:
                try:
                    connection, old_version = self._connect()
                except Exception as error:
                    # every call fails with why; the next batch tries to open the file again
                    problem = _store_error(f"cannot open the state store {self.path}", error)
                    self._answer(batch, [(False, problem)] * len(batch))
                    continue
                if old_version != SCHEMA_VERSION:
                    self.reactor.callFromThread(_log_migrated, self.path, old_version)
            self._answer(batch, self._run_batch(connection, batch))
        if connection is not None:
            connection.close()
        self.reactor.callFromThread(self._done)

    def _answer(self, batch: list[_Job], results: list[tuple[bool, Any]]) -> None:
        for job, (ok, value) in zip(batch, results, strict=True):
            self.reactor.callFromThread(self._fire, job.deferred, ok, value)

    def _run_batch(self, connection: sqlite3.Connection, batch: list[_Job]) -> list[tuple[bool, Any]]:
        writes = any(job.writes for job in batch)
        try:
            # a writer takes the lock up front: a read lock upgraded later cannot wait for it
            connection.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        except sqlite3.Error as error:
            problem = _store_error(f"the state store {self.path} is busy or broken", error)
            return [(False, problem)] * len(batch)
        results: list[tuple[bool, Any]] = []
        try:
            for job in batch:
                connection.execute("SAVEPOINT job")
                try:
                    results.append((True, job.run(connection)))
                except Exception as error:
                    connection.execute("ROLLBACK TO job")
                    results.append((False, _store_error(f"state store {self.path}", error)))
                connection.execute("RELEASE job")
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            problem = _store_error(f"the state store {self.path} could not commit", error)
            return [(False, problem)] * len(batch)
        self.transactions += 1
        return results

    def _connect(self) -> tuple[sqlite3.Connection, int]:
        """A connection to the file, made ready; and the schema version it had."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a commit survives a crash of the process; only a power loss may
            # take the last few (counters and whitelists, not mail)
            connection.execute("PRAGMA synchronous = NORMAL")
            old_version = migrate(connection, self.path)
        except BaseException:
            connection.close()
            raise
        return connection, old_version


def migrate(connection: sqlite3.Connection, path: str) -> int:
    """Create the schema or bring it up to SCHEMA_VERSION; refuse a newer one.

    Returns the version the file had (0 for a new file).
    """
    version = _version(connection)
    if version == SCHEMA_VERSION:
        return version
    connection.execute("BEGIN IMMEDIATE")  # another process may be migrating it right now
    try:
        version = _version(connection)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}, newer than this MailGate knows "
                f"({SCHEMA_VERSION}): it was written by a newer MailGate"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return version


def _log_migrated(path: str, old_version: int) -> None:
    what = "created" if old_version == 0 else f"migrated from schema version {old_version}"
    log.info("state store {path}: {what} (schema version {new})", path=path, what=what, new=SCHEMA_VERSION)


def _version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def _store_error(what: str, error: Exception) -> Exception:
    """A StoreError saying what failed and why; other errors (bugs) pass unchanged."""
    if isinstance(error, StoreError):
        return error
    if isinstance(error, (sqlite3.Error, OSError)):
        wrapped = StoreError(f"{what}: {error}")
        wrapped.__cause__ = error
        return wrapped
    return error
