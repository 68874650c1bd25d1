"""The anvil: counts per client, in this process and over its UNIX socket.

`AnvilContract` runs against the in-process `Anvil` and against an `AnvilClient`
talking to an `AnvilServer` over a real UNIX socket in a temp dir, so the two
cannot drift apart. Time is a `Clock` in both (the server's table keeps its
own); only the socket itself uses the real reactor.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Generator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from gateway.filters import anvil as anvil_module
from gateway.filters.anvil import (
    HORIZON,
    Anvil,
    AnvilClient,
    AnvilError,
    AnvilNotAsked,
    AnvilServer,
    AnvilTable,
    AnvilUnavailable,
    AuthState,
    IAnvil,
    connect_anvil,
    process_anvil,
)

# --- the table, at once ------------------------------------------------------------------


def table(max_clients: int = 100) -> tuple[AnvilTable, Clock]:
    clock = Clock()
    clock.advance(1_000)
    return AnvilTable(clock, max_clients=max_clients), clock


def test_concurrent_sessions_count_up_per_client_and_in_total() -> None:
    anvil, _ = table()
    assert anvil.connect("192.0.2.1", 60, 600).concurrent == 1
    assert anvil.connect("192.0.2.1", 60, 600).concurrent == 2
    other = anvil.connect("192.0.2.2", 60, 600)
    assert (other.concurrent, other.sessions) == (1, 3)
    anvil.disconnect("192.0.2.1", 0, 5)
    assert anvil.connect("192.0.2.1", 60, 600).concurrent == 2
    assert anvil.sessions == 3


def test_counting_down_never_goes_below_zero() -> None:
    anvil, _ = table()
    anvil.connect("192.0.2.1", 60, 600)
    anvil.release("192.0.2.1", 5)
    anvil.disconnect("192.0.2.1", 0, 0)
    anvil.disconnect("192.0.2.9", 0, 0)  # never seen
    assert anvil.sessions == 0
    assert anvil.connect("192.0.2.1", 60, 600).concurrent == 1


def test_the_rate_counts_connections_of_the_last_window_to_the_second() -> None:
    anvil, clock = table()
    for _ in range(3):
        anvil.connect("192.0.2.1", 60, 600)
        anvil.disconnect("192.0.2.1", 0, 1)
    clock.advance(30)
    assert anvil.connect("192.0.2.1", 60, 600).rate == 4
    clock.advance(30)  # the first three are 60 s old: still in the window
    assert anvil.connect("192.0.2.1", 60, 600).rate == 5
    clock.advance(1)
    assert anvil.connect("192.0.2.1", 60, 600).rate == 3  # the first three have gone


def test_errors_and_commands_of_ended_sessions_count_in_the_error_window() -> None:
    anvil, clock = table()
    anvil.connect("192.0.2.1", 60, 600)
    anvil.disconnect("192.0.2.1", errors=7, commands=10)
    clock.advance(100)
    anvil.connect("192.0.2.1", 60, 600)
    anvil.disconnect("192.0.2.1", errors=3, commands=4)
    counts = anvil.connect("192.0.2.1", 60, 600)
    assert (counts.errors, counts.commands) == (10, 14)
    clock.advance(501)  # the first session is 601 s old
    counts = anvil.connect("192.0.2.1", 60, 600)
    assert (counts.errors, counts.commands) == (3, 4)


def test_auth_failures_lock_the_client_out_at_the_limit_for_the_lockout() -> None:
    anvil, clock = table()
    for expected in range(1, 5):
        assert anvil.auth_failed("192.0.2.1", 900, 5, 3600) == AuthState(expected, 0.0)
    assert anvil.auth_failed("192.0.2.1", 900, 5, 3600) == AuthState(5, 3600.0)
    assert anvil.auth_status("192.0.2.2", 900) == AuthState(0, 0.0)
    clock.advance(1000)  # the failures have left the window; the lockout has not ended
    assert anvil.auth_status("192.0.2.1", 900) == AuthState(0, 2600.0)
    clock.advance(2600)
    assert anvil.auth_status("192.0.2.1", 900) == AuthState(0, 0.0)


def test_a_limit_of_zero_never_locks_out() -> None:
    anvil, _ = table()
    for _ in range(20):
        state = anvil.auth_failed("192.0.2.1", 900, 0, 3600)
    assert state == AuthState(20, 0.0)


def test_windows_longer_than_the_horizon_are_cut_to_it() -> None:
    anvil, clock = table()
    anvil.connect("192.0.2.1", HORIZON * 10, 600)
    clock.advance(HORIZON + 1)
    assert anvil.connect("192.0.2.1", HORIZON * 10, 600).rate == 1


def test_idle_clients_are_forgotten_and_busy_or_locked_ones_kept() -> None:
    anvil, clock = table()
    anvil.connect("192.0.2.1", 60, 600)
    anvil.disconnect("192.0.2.1", 1, 1)  # idle once its events leave the error window
    anvil.connect("192.0.2.2", 60, 600)  # a session still open
    for _ in range(5):
        anvil.auth_failed("192.0.2.3", 60, 5, 7200)  # locked out for two hours
    clock.advance(3000)
    anvil.sweep()
    assert set(anvil.clients) == {"192.0.2.2", "192.0.2.3"}
    clock.advance(7200)
    anvil.disconnect("192.0.2.2", 0, 1)
    clock.advance(601)
    anvil.sweep()
    assert set(anvil.clients) == set()


def test_the_table_sweeps_itself_as_time_goes_on() -> None:
    anvil, clock = table()
    anvil.connect("192.0.2.1", 60, 600)
    anvil.disconnect("192.0.2.1", 0, 0)
    clock.advance(120)
    anvil.connect("192.0.2.2", 60, 600)  # any question sweeps, once a minute
    assert "192.0.2.1" not in anvil.clients


def test_a_full_table_forgets_the_least_recently_seen_client_without_sessions() -> None:
    anvil, _ = table(max_clients=3)
    anvil.connect("192.0.2.1", 60, 600)  # open: kept
    anvil.connect("192.0.2.2", 60, 600)
    anvil.disconnect("192.0.2.2", 0, 1)
    anvil.connect("192.0.2.3", 60, 600)
    anvil.disconnect("192.0.2.3", 0, 1)
    anvil.connect("192.0.2.2", 60, 600)  # seen again: now .3 is the oldest idle one
    anvil.disconnect("192.0.2.2", 0, 1)
    anvil.connect("192.0.2.4", 60, 600)
    assert set(anvil.clients) == {"192.0.2.1", "192.0.2.2", "192.0.2.4"}
    assert anvil.sessions == 2


def test_a_table_full_of_open_sessions_stays_bounded() -> None:
    anvil, _ = table(max_clients=2)
    for number in range(1, 6):
        anvil.connect(f"192.0.2.{number}", 60, 600)
    assert len(anvil.clients) == 2
    assert anvil.sessions == 2  # the forgotten clients' sessions are forgotten with them


def test_a_full_table_makes_room_without_walking_every_client() -> None:
    # a table full of clients seen inside the window (a spam run from many
    # addresses): each new client must not cost a sweep over the whole table
    anvil, clock = table(max_clients=1000)
    for number in range(1000):
        client = f"10.0.{number >> 8}.{number & 255}"
        anvil.connect(client, 60, 600)
        anvil.disconnect(client, 0, 4)
    walked = 0
    sweep = anvil.sweep

    def counted_sweep(now: float | None = None) -> None:
        nonlocal walked
        walked += 1
        sweep(now)

    anvil.sweep = counted_sweep  # type: ignore[method-assign]
    for number in range(200):
        anvil.connect(f"10.1.0.{number}", 60, 600)
    assert walked == 0
    assert len(anvil.clients) == 1000
    assert "10.0.0.0" not in anvil.clients  # the least recently seen went first
    assert "10.0.3.231" in anvil.clients
    clock.advance(61)
    anvil.connect("10.2.0.1", 60, 600)
    assert walked == 1  # the minute's sweep still comes


def test_a_full_table_passes_over_clients_with_sessions_open_once() -> None:
    anvil, _ = table(max_clients=4)
    anvil.connect("192.0.2.1", 60, 600)  # open, and the oldest
    for number in (2, 3, 4):
        anvil.connect(f"192.0.2.{number}", 60, 600)
        anvil.disconnect(f"192.0.2.{number}", 0, 1)
    anvil.connect("192.0.2.5", 60, 600)  # .2 goes; .1, passed over, goes to the back
    assert list(anvil.clients) == ["192.0.2.3", "192.0.2.4", "192.0.2.1", "192.0.2.5"]
    assert anvil.sessions == 2


def test_a_remembered_client_costs_well_under_a_kilobyte() -> None:
    # up to 100,000 clients per process: with a deque per kind of event (760
    # bytes each, even empty) that was 270 MB; plain lists make it about 70
    import tracemalloc

    anvil, _ = table(max_clients=20_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(10_000):
            client = f"10.0.{number >> 8}.{number & 255}"
            anvil.connect(client, 60, 600)
            anvil.disconnect(client, 0, 4)
        per_client = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    finally:
        tracemalloc.stop()
    assert per_client < 1000, per_client


# --- the wire, on its own --------------------------------------------------------------


def served(table_: AnvilTable) -> tuple[Any, StringTransport]:
    from gateway.filters.anvil import _ServerFactory

    protocol = _ServerFactory(table_).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize(
    "line",
    [
        b"HELLO",
        b"",
        b"CONNECT 192.0.2.1 60",
        b"CONNECT 192.0.2.1 sixty 600",
        b"CONNECT 192.0.2.1 -1 600",
        b"CONNECT 192.0.2.1 nan 600",
        b"DISCONNECT 192.0.2.1 -3 4",
        b"AUTH-FAIL 192.0.2.1 900 five 3600",
        b"CONNECT \xff 60 600",
    ],
)
def test_a_bad_request_gets_err_and_counts_nothing(line: bytes) -> None:
    anvil, _ = table()
    protocol, transport = served(anvil)
    protocol.dataReceived(line + b"\n")
    assert transport.value().startswith(b"ERR ")
    assert transport.value().count(b"\n") == 1
    assert anvil.sessions == 0 and not transport.disconnecting


def test_answers_come_in_the_order_of_the_requests() -> None:
    anvil, _ = table()
    protocol, transport = served(anvil)
    protocol.dataReceived(
        b"CONNECT 192.0.2.1 60 600\nCONNECT 192.0.2.1 60 600\nAUTH-FAIL 192.0.2.1 900 5 3600\n"
        b"AUTH-STATUS 192.0.2.1 900\nDISCONNECT 192.0.2.1 2 3\n"
    )
    assert transport.value().split(b"\n") == [
        b"OK 1 1 1 0 0",
        b"OK 2 2 2 0 0",
        b"OK 1 0.000",
        b"OK 1 0.000",
        b"OK",
        b"",
    ]


def test_an_overlong_line_ends_the_connection() -> None:
    anvil, _ = table()
    protocol, transport = served(anvil)
    protocol.dataReceived(b"CONNECT " + b"1" * 1000 + b"\n")
    assert transport.disconnecting


# --- the contract: in-process, and client + server over a UNIX socket ----------------------


class AnvilContract:
    """What every IAnvil does. Subclasses provide `anvil` and its `clock` in setUp."""

    anvil: Any
    clock: Clock

    def test_provides_ianvil(self) -> None:
        assert verifyObject(IAnvil, self.anvil)

    @inlineCallbacks
    def test_sessions_count_up_and_down(self) -> Generator[Deferred[Any], Any, None]:
        first = yield self.anvil.connect("192.0.2.1", 60, 600)
        second = yield self.anvil.connect("192.0.2.1", 60, 600)
        other = yield self.anvil.connect("2001:db8::1", 60, 600)
        assert (first.concurrent, second.concurrent, second.rate) == (1, 2, 2)
        assert (other.concurrent, other.sessions, other.rate) == (1, 3, 1)
        yield self.anvil.disconnect("192.0.2.1", 0, 4)
        yield self.anvil.disconnect("192.0.2.1", 0, 4)
        again = yield self.anvil.connect("192.0.2.1", 60, 600)
        assert (again.concurrent, again.sessions, again.rate) == (1, 2, 3)

    @inlineCallbacks
    def test_windows_forget_old_events(self) -> Generator[Deferred[Any], Any, None]:
        yield self.anvil.connect("192.0.2.1", 60, 600)
        yield self.anvil.disconnect("192.0.2.1", 6, 8)
        self.clock.advance(61)
        counts = yield self.anvil.connect("192.0.2.1", 60, 600)
        assert (counts.rate, counts.errors, counts.commands) == (1, 6, 8)
        self.clock.advance(540)
        counts = yield self.anvil.connect("192.0.2.1", 60, 600)
        assert (counts.rate, counts.errors, counts.commands) == (1, 0, 0)

    @inlineCallbacks
    def test_auth_failures_lock_out(self) -> Generator[Deferred[Any], Any, None]:
        for _ in range(4):
            yield self.anvil.auth_failed("192.0.2.1", 900, 5, 3600)
        state = yield self.anvil.auth_status("192.0.2.1", 900)
        assert state == AuthState(4, 0.0)
        state = yield self.anvil.auth_failed("192.0.2.1", 900, 5, 3600)
        assert state == AuthState(5, 3600.0)
        self.clock.advance(1800.5)
        state = yield self.anvil.auth_status("192.0.2.1", 900)
        assert state == AuthState(0, 1799.5)
        other = yield self.anvil.auth_status("192.0.2.2", 900)
        assert other == AuthState(0, 0.0)


class InProcessAnvilTests(AnvilContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.anvil = Anvil(self.clock)


def short_temp_dir(case: TestCase) -> str:
    # a UNIX socket path must stay under ~100 bytes: not pytest's long tmp_path
    directory = tempfile.mkdtemp(prefix="anvil-")
    case.addCleanup(shutil.rmtree, directory, True)
    return directory


class SocketAnvilTests(AnvilContract, TestCase):
    """The contract through AnvilClient -> UNIX socket -> AnvilServer -> Anvil."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = os.path.join(short_temp_dir(self), "anvil.sock")
        self.server = self.start_server(Anvil(self.clock))
        self.anvil = AnvilClient(self.path, reactor)
        self.addCleanup(self.anvil.close)

    def start_server(self, anvil: Anvil) -> AnvilServer:
        server = AnvilServer(self.path, anvil, reactor)
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        return server


class SocketTests(TestCase):
    """What only the socket pair does: modes, lost connections, restarts, timeouts."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = short_temp_dir(self)
        self.path = os.path.join(self.directory, "anvil.sock")
        self.anvil = Anvil(self.clock)

    def start_server(self) -> AnvilServer:
        server = AnvilServer(self.path, self.anvil, reactor)
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        return server

    def client(self, **kwargs: Any) -> AnvilClient:
        client = AnvilClient(self.path, kwargs.pop("reactor", reactor), **kwargs)
        self.addCleanup(client.close)
        return client

    def test_the_socket_is_for_the_gateway_user_only(self) -> None:
        self.start_server()
        assert stat.S_IMODE(os.stat(self.path).st_mode) == 0o600

    @inlineCallbacks
    def test_a_lost_worker_connection_counts_its_sessions_down(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        self.start_server()
        dying, living = self.client(), self.client()
        yield dying.connect("192.0.2.1", 60, 600)
        yield dying.connect("192.0.2.1", 60, 600)
        yield living.connect("192.0.2.1", 60, 600)
        yield dying.close()  # the worker died with two sessions open
        yield living.disconnect("192.0.2.2", 0, 0)  # a round trip: the server has seen the loss
        counts = yield living.connect("192.0.2.1", 60, 600)
        assert (counts.concurrent, counts.sessions) == (2, 2)

    @inlineCallbacks
    def test_an_end_reported_on_a_new_connection_does_not_count_down_others(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        self.start_server()
        worker, other = self.client(), self.client()
        yield worker.connect("192.0.2.1", 60, 600)
        yield other.connect("192.0.2.1", 60, 600)
        yield worker.close()  # the server counts the worker's session down itself
        yield worker.disconnect("192.0.2.1", 3, 5)  # reconnects: its numbers still count
        counts = yield other.connect("192.0.2.1", 60, 600)
        assert (counts.concurrent, counts.errors, counts.commands) == (2, 3, 5)

    @inlineCallbacks
    def test_no_anvil_fails_the_request(self) -> Generator[Deferred[Any], Any, None]:
        client = self.client()
        with pytest.raises(AnvilNotAsked):  # never sent: nothing was counted
            yield client.connect("192.0.2.1", 60, 600)

    @inlineCallbacks
    def test_the_client_reconnects_when_the_main_process_restarts_the_anvil(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        server = self.start_server()
        client = self.client()
        counts = yield client.connect("192.0.2.1", 60, 600)
        assert counts.concurrent == 1
        yield server.stopService()
        with pytest.raises(AnvilUnavailable):
            yield client.connect("192.0.2.1", 60, 600)
        self.anvil = Anvil(self.clock)  # a new main process: a fresh table
        self.start_server()
        counts = yield client.connect("192.0.2.1", 60, 600)
        assert (counts.concurrent, counts.rate) == (1, 1)

    @inlineCallbacks
    def test_requests_made_while_connecting_all_go_through(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        self.start_server()
        client = self.client()
        asked = [client.connect("192.0.2.1", 60, 600) for _ in range(3)]
        answers = []
        for deferred in asked:
            answers.append((yield deferred))
        assert [a.concurrent for a in answers] == [1, 2, 3]

    @inlineCallbacks
    def test_an_anvil_that_does_not_answer_fails_the_request_after_the_timeout(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        silent = Factory.forProtocol(Protocol)  # reads and never answers
        port = reactor.listenUNIX(self.path, silent)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        timers = Clock()
        client = self.client(reactor=SplitReactor(timers), timeout=5)
        asked = client.connect("192.0.2.1", 60, 600)
        yield client_connected(client)
        assert not asked.called
        timers.advance(5)
        with pytest.raises(AnvilUnavailable) as raised:
            yield asked
        assert not isinstance(raised.value, AnvilNotAsked)  # sent: the anvil may have counted it

    @inlineCallbacks
    def test_a_bad_client_name_is_refused_before_the_wire(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        client = self.client()
        with pytest.raises(AnvilError):
            yield client.connect("192.0.2.1 60 600\nCONNECT x", 60, 600)
        assert client.protocol is None


class SplitReactor:
    """The real reactor for sockets, a Clock for timers."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def callLater(self, delay: float, function: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, function, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def client_connected(client: AnvilClient) -> Deferred[None]:
    """Fires once the client's connection is up (polling the real reactor)."""
    from twisted.internet.task import deferLater

    def check() -> Deferred[None] | None:
        if client.protocol is not None:
            return None
        return deferLater(reactor, 0.01, check)  # type: ignore[arg-type]

    return deferLater(reactor, 0, check)  # type: ignore[arg-type]


# --- which anvil a process gets ----------------------------------------------------------


class Config:
    class gateway:
        state_dir = "/var/lib/mailgate"

    class smtp:
        workers = 2


class OneWorker(Config):
    class smtp:
        workers = 1


def test_one_of_several_workers_gets_a_client_of_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_WORKER", "2")
    anvil = connect_anvil(Config(), Clock())
    assert isinstance(anvil, AnvilClient)
    assert anvil.path == "/var/lib/mailgate/anvil.sock"


def test_a_single_worker_counts_its_sessions_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_WORKER", "1")
    monkeypatch.setattr(anvil_module, "_process_anvil", None)
    clock = Clock()
    assert connect_anvil(OneWorker(), clock) is process_anvil(clock)


def test_the_main_process_gets_its_own_anvil_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGATE_WORKER", raising=False)
    monkeypatch.setattr(anvil_module, "_process_anvil", None)
    clock = Clock()
    anvil = connect_anvil(Config(), clock)
    assert isinstance(anvil, Anvil)
    assert connect_anvil(Config(), clock) is anvil is process_anvil(clock)
