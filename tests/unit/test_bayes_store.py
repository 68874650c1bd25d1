"""The ITokenStore contract, run against SqliteTokenStore and its fake MemoryTokenStore alike.

Then what only the SQLite file does: a training command and the gateway sharing
one file, the schema version, a file that cannot be opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.bayes.sqlite import SCHEMA_VERSION, SqliteTokenStore, TokenDatabase
from gateway.bayes.store import ITokenStore, Learned, MemoryTokenStore, TokenCounts, bayes_path
from gateway.config import parse
from gateway.queue.testing import PumpedReactor
from gateway.state import StoreClosed, StoreError

T = TypeVar("T")

SPAM = frozenset({"viagra", "cheap", "subject:offer"})
HAM = frozenset({"meeting", "agenda", "cheap"})


@attrs.define
class StoreCase:
    store: Any
    clock: Clock
    wait_for: Callable[[Deferred[Any]], Any]
    kind: str

    def wait(self, deferred: Deferred[T]) -> T:
        result: T = self.wait_for(deferred)
        return result


def fired(deferred: Deferred[T]) -> T:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "a MemoryTokenStore Deferred should have fired at once"
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
    clock.advance(1_700_000_000)
    if request.param == "memory":
        yield StoreCase(MemoryTokenStore(clock), clock, fired, "memory")
        return
    store = SqliteTokenStore(str(tmp_path / "bayes.sqlite"), pumped, clock=clock)
    yield StoreCase(store, clock, pumped.wait, "sqlite")
    pumped.wait(store.close())


# --- the contract -----------------------------------------------------------------


def test_provides_the_interface(case: StoreCase) -> None:
    assert verifyObject(ITokenStore, case.store)


def test_an_empty_store_knows_nothing(case: StoreCase) -> None:
    assert case.wait(case.store.counts(["viagra"])) == TokenCounts(0, 0, {})
    stats = case.wait(case.store.stats())
    assert (stats.nspam, stats.nham, stats.tokens, stats.messages, stats.last_learned) == (0, 0, 0, 0, None)


def test_learned_tokens_are_counted_per_class(case: StoreCase) -> None:
    assert case.wait(case.store.learn("s1", SPAM, True)) is Learned.LEARNED
    assert case.wait(case.store.learn("s2", {"viagra"}, True)) is Learned.LEARNED
    assert case.wait(case.store.learn("h1", HAM, False)) is Learned.LEARNED
    counts = case.wait(case.store.counts(["viagra", "cheap", "meeting", "never-seen"]))
    assert counts == TokenCounts(2, 1, {"viagra": (2, 0), "cheap": (1, 1), "meeting": (0, 1)})


def test_a_token_counts_once_per_message(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", ["free", "free", "free"], True))
    assert case.wait(case.store.counts(["free"])).tokens == {"free": (1, 0)}


def test_learning_the_same_message_again_changes_nothing(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", SPAM, True))
    assert case.wait(case.store.learn("s1", SPAM, True)) is Learned.ALREADY
    counts = case.wait(case.store.counts(SPAM))
    assert (counts.nspam, counts.tokens["viagra"]) == (1, (1, 0))


def test_relearning_as_the_other_class_moves_the_message(case: StoreCase) -> None:
    case.wait(case.store.learn("m", SPAM, True))
    case.wait(case.store.learn("other", {"viagra"}, True))
    assert case.wait(case.store.learn("m", SPAM, False)) is Learned.RELEARNED
    counts = case.wait(case.store.counts(SPAM))
    assert (counts.nspam, counts.nham) == (1, 1)
    assert counts.tokens == {"viagra": (1, 1), "cheap": (0, 1), "subject:offer": (0, 1)}
    assert case.wait(case.store.learned("m")) is False


def test_forgetting_takes_a_message_out(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", SPAM, True))
    case.wait(case.store.learn("h1", HAM, False))
    assert case.wait(case.store.forget("s1", SPAM)) is True
    counts = case.wait(case.store.counts(SPAM | HAM))
    assert counts == TokenCounts(0, 1, {"meeting": (0, 1), "agenda": (0, 1), "cheap": (0, 1)})
    assert case.wait(case.store.forget("s1", SPAM)) is False  # not learned any more
    assert case.wait(case.store.learned("s1")) is None
    assert case.wait(case.store.stats()).tokens == 3  # tokens at zero are gone


def test_counts_never_go_below_zero(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", {"a"}, True))
    # forgotten with more tokens than it was learned with (a newer tokenizer, say)
    case.wait(case.store.forget("s1", {"a", "b"}))
    case.wait(case.store.learn("s2", {"b"}, True))
    assert case.wait(case.store.counts({"a", "b"})) == TokenCounts(1, 0, {"b": (1, 0)})


def test_learned_says_how_a_message_was_learned(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", SPAM, True))
    case.wait(case.store.learn("h1", HAM, False))
    assert case.wait(case.store.learned("s1")) is True
    assert case.wait(case.store.learned("h1")) is False
    assert case.wait(case.store.learned("x")) is None


def test_stats_count_messages_tokens_and_the_last_learning(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", SPAM, True))
    case.clock.advance(60)
    case.wait(case.store.learn("h1", HAM, False))
    stats = case.wait(case.store.stats())
    assert (stats.nspam, stats.nham, stats.tokens, stats.messages) == (1, 1, 5, 2)
    assert stats.last_learned == case.clock.seconds()


def test_many_tokens_are_looked_up_at_once(case: StoreCase) -> None:
    many = {f"token{n}" for n in range(2500)}  # more than one query's worth of parameters
    case.wait(case.store.learn("big", many, True))
    counts = case.wait(case.store.counts(many | {"missing"}))
    assert len(counts.tokens) == 2500 and counts.tokens["token1999"] == (1, 0)


def test_a_closed_store_refuses_calls(case: StoreCase) -> None:
    case.wait(case.store.learn("s1", SPAM, True))
    case.wait(case.store.close())
    with pytest.raises(StoreClosed):
        case.wait(case.store.counts(SPAM))
    with pytest.raises(StoreClosed):
        case.wait(case.store.learn("s2", SPAM, True))


# --- the SQLite file --------------------------------------------------------------


def test_the_file_is_in_the_state_directory(tmp_path: Path) -> None:
    cfg = parse(f'[gateway]\nhostname = "gw.test"\nstate_dir = "{tmp_path}"\n', "mailgate.toml", base_dir="/")
    assert bayes_path(cfg) == str(tmp_path / "bayes.sqlite")


def test_a_training_command_and_the_gateway_share_the_file(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = str(tmp_path / "bayes.sqlite")
    gateway = SqliteTokenStore(path, pumped, clock=Clock())
    assert pumped.wait(gateway.counts(SPAM)) == TokenCounts(0, 0, {})  # the gateway has it open
    command = TokenDatabase(path)
    assert command.learn_many([("s1", SPAM, True), ("h1", HAM, False), ("s1", SPAM, True)]) == [
        Learned.LEARNED,
        Learned.LEARNED,
        Learned.ALREADY,
    ]
    command.close()
    assert pumped.wait(gateway.counts({"cheap"})) == TokenCounts(1, 1, {"cheap": (1, 1)})
    assert pumped.wait(gateway.learn("h1", HAM, True)) is Learned.RELEARNED
    pumped.wait(gateway.close())
    assert TokenDatabase(path).stats().nspam == 2


def test_a_file_from_a_newer_mailgate_is_refused(tmp_path: Path, pumped: PumpedReactor) -> None:
    path = str(tmp_path / "bayes.sqlite")
    TokenDatabase(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer MailGate"):
        TokenDatabase(path)
    store = SqliteTokenStore(path, pumped)
    with pytest.raises(StoreError, match="newer MailGate"):
        pumped.wait(store.counts(SPAM))
    pumped.wait(store.close())


def test_a_file_that_cannot_be_opened_fails_each_call_with_why(tmp_path: Path, pumped: PumpedReactor) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = SqliteTokenStore(str(blocker / "bayes.sqlite"), pumped, clock=Clock())
    with pytest.raises(StoreError, match="not-a-directory"):
        pumped.wait(store.counts(SPAM))
    with pytest.raises(StoreError):
        pumped.wait(store.learn("s1", SPAM, True))  # tried again, failed again
    pumped.wait(store.close())


def test_a_write_waits_for_another_writer_then_fails_cleanly(tmp_path: Path) -> None:
    path = str(tmp_path / "bayes.sqlite")
    TokenDatabase(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing and does not finish
    try:
        waiting = TokenDatabase(path, busy_timeout=0.2)
        assert waiting.counts(SPAM).nspam == 0  # readers go on (WAL)
        with pytest.raises(StoreError, match="busy"):
            waiting.learn("s1", SPAM, True)
        waiting.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert TokenDatabase(path).learn("s1", SPAM, True) is Learned.LEARNED
