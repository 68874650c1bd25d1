"""The IStateStore contract, run against SqliteStore and its fake MemoryStore alike.

Then what only the SQLite file does: two processes' stores sharing one file, a
schema version, a file locked by another process, batched commits.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import parse
from gateway.queue.testing import PumpedReactor
from gateway.state import IStateStore, StoreClosed, StoreError, open_store
from gateway.state.memory import MemoryStore
from gateway.state.sqlite import SCHEMA_VERSION, SqliteStore

T = TypeVar("T")


@attrs.define
class StoreCase:
    """A store under test, its clock, and how to wait for its Deferreds."""

    store: Any
    clock: Clock
    wait_for: Callable[[Deferred[Any]], Any]
    kind: str

    def wait(self, deferred: Deferred[T]) -> T:
        result: T = self.wait_for(deferred)
        return result


def fired(deferred: Deferred[T]) -> T:
    """The result of a Deferred that has fired (a MemoryStore's), or its failure raised."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "a MemoryStore Deferred should have fired at once"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    result: T = outcome[0]
    return result


@pytest.fixture
def pumped() -> PumpedReactor:
    return PumpedReactor()


@pytest.fixture(params=["sqlite", "memory"])
def case(request: pytest.FixtureRequest, tmp_path: Path, pumped: PumpedReactor) -> Iterator[StoreCase]:
    clock = Clock()
    clock.advance(1_700_000_000)  # a realistic POSIX time
    if request.param == "memory":
        yield StoreCase(MemoryStore(clock), clock, fired, "memory")
        return
    store = SqliteStore(str(tmp_path / "state.sqlite"), pumped, clock=clock)
    yield StoreCase(store, clock, pumped.wait, "sqlite")
    pumped.wait(store.close())


# --- the contract ------------------------------------------------------------------


def test_provides_the_interface(case: StoreCase) -> None:
    assert verifyObject(IStateStore, case.store)


def test_a_value_comes_back_as_json(case: StoreCase) -> None:
    assert case.wait(case.store.get("t", "missing")) is None
    case.wait(case.store.put("t", "k", {"first": 12.5, "hosts": ("a", "b"), "ok": True}))
    assert case.wait(case.store.get("t", "k")) == {"first": 12.5, "hosts": ["a", "b"], "ok": True}
    case.wait(case.store.put("t", "k", "replaced"))
    assert case.wait(case.store.get("t", "k")) == "replaced"


def test_tables_are_separate(case: StoreCase) -> None:
    case.wait(case.store.put("greylist", "k", 1))
    case.wait(case.store.increment("greylist", "k"))
    assert case.wait(case.store.get("quota", "k")) is None
    assert case.wait(case.store.count("quota", "k")) == 0


def test_a_value_expires_after_its_ttl(case: StoreCase) -> None:
    case.wait(case.store.put("t", "short", "x", ttl=10))
    case.wait(case.store.put("t", "forever", "y"))
    case.clock.advance(9.9)
    assert case.wait(case.store.get("t", "short")) == "x"
    case.clock.advance(0.1)
    assert case.wait(case.store.get("t", "short")) is None
    case.clock.advance(10 * 365 * 86400)
    assert case.wait(case.store.get("t", "forever")) == "y"


def test_a_put_renews_the_ttl(case: StoreCase) -> None:
    case.wait(case.store.put("t", "k", 1, ttl=10))
    case.clock.advance(8)
    case.wait(case.store.put("t", "k", 2, ttl=10))
    case.clock.advance(8)
    assert case.wait(case.store.get("t", "k")) == 2


def test_add_stores_only_when_there_is_no_live_value(case: StoreCase) -> None:
    assert case.wait(case.store.add("alerts", "k", "first", ttl=60)) is True
    assert case.wait(case.store.add("alerts", "k", "second", ttl=60)) is False
    assert case.wait(case.store.get("alerts", "k")) == "first"
    case.clock.advance(60)
    assert case.wait(case.store.add("alerts", "k", "third", ttl=60)) is True
    assert case.wait(case.store.get("alerts", "k")) == "third"
    case.wait(case.store.put("alerts", "never", 1))
    assert case.wait(case.store.add("alerts", "never", 2)) is False


def test_delete_forgets_value_and_counter(case: StoreCase) -> None:
    case.wait(case.store.put("t", "k", 1))
    case.wait(case.store.increment("t", "k", 5))
    case.wait(case.store.delete("t", "k"))
    assert case.wait(case.store.get("t", "k")) is None
    assert case.wait(case.store.count("t", "k")) == 0
    case.wait(case.store.delete("t", "never-there"))  # not an error


def test_counter_counts_within_its_window_then_starts_again(case: StoreCase) -> None:
    store = case.store
    assert case.wait(store.increment("q", "alice", window=3600)) == 1
    case.clock.advance(1000)
    assert case.wait(store.increment("q", "alice", 4, window=3600)) == 5
    assert case.wait(store.count("q", "alice")) == 5
    # the window opened at the first increment, not the last
    case.clock.advance(2600)
    assert case.wait(store.count("q", "alice")) == 0
    assert case.wait(store.increment("q", "alice", window=3600)) == 1
    assert case.wait(store.count("q", "nobody")) == 0


def test_counter_without_window_never_resets(case: StoreCase) -> None:
    for _ in range(3):
        case.wait(case.store.increment("bayes", "token"))
    case.clock.advance(10 * 365 * 86400)
    assert case.wait(case.store.increment("bayes", "token")) == 4


def test_expire_deletes_expired_rows_only(case: StoreCase) -> None:
    store = case.store
    case.wait(store.expire())  # whatever an earlier sweep left
    case.wait(store.put("t", "old", 1, ttl=5))
    case.wait(store.put("t", "new", 1, ttl=50))
    case.wait(store.increment("c", "old", window=5))
    case.wait(store.increment("c", "keep"))
    case.clock.advance(5)
    assert case.wait(store.expire()) == 2
    assert case.wait(store.get("t", "new")) == 1
    assert case.wait(store.count("c", "keep")) == 1
    assert case.wait(store.expire()) == 0


def test_calls_after_close_fail(case: StoreCase) -> None:
    case.wait(case.store.put("t", "k", 1))
    case.wait(case.store.close())
    with pytest.raises(StoreClosed):
        case.wait(case.store.get("t", "k"))


# --- SQLite: one file, several processes ----------------------------------------


def raw(path: Path) -> sqlite3.Connection:
    """Another process's view of the file."""
    return sqlite3.connect(str(path), isolation_level=None, timeout=0)


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path, pumped: PumpedReactor) -> None:
    clock = Clock()
    path = str(tmp_path / "state.sqlite")
    worker = SqliteStore(path, pumped, clock=clock)
    main = SqliteStore(path, pumped, clock=clock)
    try:
        pumped.wait(worker.put("greylist", "triplet", {"first": 1}, ttl=100))
        assert pumped.wait(main.get("greylist", "triplet")) == {"first": 1}
        # counters add up across processes, whoever increments
        totals = [pumped.wait(store.increment("quota", "alice", window=3600)) for store in (worker, main) * 5]
        assert totals == list(range(1, 11))
        assert pumped.wait(worker.count("quota", "alice")) == 10
        # of two processes racing to add, one wins
        added = [worker.add("alerts", "alice", "w", ttl=3600), main.add("alerts", "alice", "m", ttl=3600)]
        assert sorted(pumped.wait(d) for d in added) == [False, True]
        pumped.wait(main.delete("greylist", "triplet"))
        assert pumped.wait(worker.get("greylist", "triplet")) is None
    finally:
        pumped.wait(worker.close())
        pumped.wait(main.close())


def test_the_file_is_in_wal_mode_with_the_current_schema(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = tmp_path / "state" / "state.sqlite"  # the directory is created too
    store = SqliteStore(str(path), pumped, clock=Clock())
    pumped.wait(store.put("t", "k", 1))
    pumped.wait(store.close())
    connection = raw(path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    connection.close()
    # and the data outlives the store
    again = SqliteStore(str(path), pumped, clock=Clock())
    assert pumped.wait(again.get("t", "k")) == 1
    pumped.wait(again.close())


def test_a_file_from_a_newer_mailgate_is_refused(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = tmp_path / "state.sqlite"
    connection = raw(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    store = SqliteStore(str(path), pumped, clock=Clock())
    with pytest.raises(
        StoreError,
        match=rf"schema version {SCHEMA_VERSION + 1}, newer than this MailGate knows \({SCHEMA_VERSION}\)",
    ):
        pumped.wait(store.get("t", "k"))
    pumped.wait(store.close())


def test_a_file_that_is_not_a_database_fails_each_call_with_its_name(
    tmp_path: Path, pumped: PumpedReactor
) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not SQLite" * 100)
    store = SqliteStore(str(path), pumped, clock=Clock())
    with pytest.raises(StoreError, match=f"cannot open the state store {path}: file is not a database"):
        pumped.wait(store.get("t", "k"))
    # the next call tries again: once the file is fixed the store works
    path.unlink()
    assert pumped.wait(store.get("t", "k")) is None
    pumped.wait(store.close())


def test_a_file_locked_by_another_process_does_not_block_the_caller(
    tmp_path: Path, pumped: PumpedReactor
) -> None:
    path = tmp_path / "state.sqlite"
    store = SqliteStore(str(path), pumped, clock=Clock(), busy_timeout=10)
    pumped.wait(store.put("t", "k", 0))
    other = raw(path)
    other.execute("BEGIN IMMEDIATE")  # another process writing, for a while
    other.execute("UPDATE entries SET value = '1'")
    writes = [store.put("t", f"key{n}", n) for n in range(50)]
    read = store.get("t", "k")
    # the calls returned at once; they wait in the store's thread, not the caller's
    pumped.pump(timeout=0.3)
    assert not any(d.called for d in writes)
    committed_before = store.transactions
    other.execute("COMMIT")
    other.close()
    for number, deferred in enumerate(writes):
        assert pumped.wait(deferred) is None, number
    assert pumped.wait(read) == 1
    # what queued up while the file was locked was committed in (at most) two transactions
    assert store.transactions - committed_before <= 2
    pumped.wait(store.close())


def test_a_lock_held_past_the_busy_timeout_fails_the_call(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = tmp_path / "state.sqlite"
    store = SqliteStore(str(path), pumped, clock=Clock(), busy_timeout=0.2)
    pumped.wait(store.put("t", "k", 0))
    other = raw(path)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="database is locked"):
            pumped.wait(store.increment("t", "k"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert pumped.wait(store.increment("t", "k")) == 1  # and it recovers
    pumped.wait(store.close())


def test_a_bad_call_does_not_spoil_the_others_in_its_batch(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = tmp_path / "state.sqlite"
    store = SqliteStore(str(path), pumped, clock=Clock())
    pumped.wait(store.put("t", "warm", 1))
    other = raw(path)
    other.execute("BEGIN IMMEDIATE")  # hold them back so they run as one batch

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO entries (tbl, key, value) VALUES ('t', 'half', '1')")
        raise ZeroDivisionError("a bug")

    before = store.put("t", "before", 1)
    bad = store._submit(broken, writes=True)
    after = store.increment("t", "after")
    other.execute("ROLLBACK")
    other.close()
    assert pumped.wait(before) is None
    with pytest.raises(ZeroDivisionError):
        pumped.wait(bad)
    assert pumped.wait(after) == 1
    assert pumped.wait(store.get("t", "before")) == 1
    assert pumped.wait(store.get("t", "half")) is None  # the bad call's own write was undone
    pumped.wait(store.close())


def test_expired_rows_are_swept_by_themselves(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = tmp_path / "state.sqlite"
    clock = Clock()
    store = SqliteStore(str(path), pumped, clock=clock, expire_interval=600)
    pumped.wait(store.put("t", "old", 1, ttl=10))
    clock.advance(601)
    pumped.wait(store.put("t", "new", 1))  # the first call after the interval sweeps
    connection = raw(path)
    assert connection.execute("SELECT key FROM entries").fetchall() == [("new",)]
    connection.close()
    pumped.wait(store.close())


class RecordingReactor(PumpedReactor):
    """A reactor that records the shutdown triggers it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, Callable[[], Any]]] = []

    def addSystemEventTrigger(self, phase: str, event: str, call: Callable[[], Any]) -> None:
        self.triggers.append((phase, event, call))

    def seconds(self) -> float:
        return 0.0


def test_open_store_waits_for_the_first_call_and_closes_with_the_reactor(tmp_path: Path) -> None:
    cfg = parse(f'[gateway]\nstate_dir = "{tmp_path}/state"\n', base_dir=str(tmp_path))
    reactor = RecordingReactor()
    threads = threading.active_count()
    store = open_store(cfg, reactor)
    path = tmp_path / "state" / "state.sqlite"
    # nothing yet: twistd forks into a daemon and drops privileges after building filters
    assert not os.path.exists(path)
    assert threading.active_count() == threads
    reactor.wait(store.put("t", "k", 1))
    assert path.exists()
    [(phase, event, close)] = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    reactor.wait(close())
    with pytest.raises(StoreClosed):
        reactor.wait(store.get("t", "k"))


# --- the fake ----------------------------------------------------------------------


def test_memory_store_fails_as_told() -> None:
    store = MemoryStore(Clock())
    store.failure = StoreError("disk full")
    with pytest.raises(StoreError, match="disk full"):
        fired(store.increment("t", "k"))
