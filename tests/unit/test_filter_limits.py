"""The "limits" filter: connection, rate, error-ratio, harvest, RSET and AUTH limits.

Most tests ask the filter directly, with a `Clock` and the in-process `Anvil`;
the last ones are SMTP dialogues through the real server and reception, as a
client sees the limits.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway import config as configuration
from gateway.filters import FilterServices, Request
from gateway.filters.anvil import Anvil, AnvilNotAsked
from gateway.filters.chain import ChainRunner, Link
from gateway.filters.limits import Limits
from gateway.filters.testing import StaticFilter
from gateway.interfaces import IAuthGuard, IFilter, ISessionObserver
from gateway.model import CONTINUE, Action, Direction, Session, Stage, Verdict
from gateway.smtp.server import SmtpServerFactory

from .test_smtp_auth import b64, credentials
from .test_smtp_server import SETTINGS, Dialogue, TlsCapableTransport
from .test_smtp_server_filters import Gateway


def build(options: str = "", anvil: Any = None) -> tuple[Limits, Clock]:
    text = f'[filters]\ninbound = ["limits"]\n[filters.limits]\n{options}\n'
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    clock = Clock()
    clock.advance(1_700_000_000)
    services = FilterServices(cfg, clock, anvil=anvil if anvil is not None else Anvil(clock))
    section = cfg.filters.section(cfg.source, "limits")
    limits = Limits.from_config(section, services)
    section.done()
    return limits, clock


def client(host: str = "192.0.2.1", port: int = 40000, **kwargs: Any) -> Session:
    return Session(peer_host=host, peer_port=port, listener="tcp:25", **kwargs)


def settled(answer: Verdict | Deferred[Verdict]) -> Any:
    """The verdict (or Failure) of an answer that has already fired."""
    if isinstance(answer, Verdict):
        return answer
    found: list[Any] = []
    answer.addBoth(found.append)
    assert found, "the answer did not fire"
    return found[0]


def connect(limits: Limits, session: Session) -> Verdict:
    verdict = settled(limits.check(Request(Stage.CONNECT, Direction.INBOUND, session)))
    assert isinstance(verdict, Verdict), verdict
    return verdict


def ask(limits: Limits, stage: Stage, session: Session | None = None, **counts: int) -> Verdict:
    request = Request(stage, Direction.INBOUND, session or client(), counts=dict(counts))
    verdict = settled(limits.check(request))
    assert isinstance(verdict, Verdict)
    return verdict


def is_cut_off(verdict: Verdict, words: str) -> bool:
    return (
        verdict.action is Action.DEFER
        and (verdict.code, verdict.enhanced) == (421, "4.7.0")
        and words in verdict.reason
    )


# --- configuration -----------------------------------------------------------------------


def test_provides_the_filter_observer_and_auth_guard_interfaces() -> None:
    limits, _ = build()
    assert verifyObject(IFilter, limits)
    assert verifyObject(ISessionObserver, limits)
    assert verifyObject(IAuthGuard, limits)


def test_the_defaults_are_the_seed_defaults() -> None:
    settings = build()[0].settings
    assert (settings.max_connections_per_ip, settings.max_connection_rate, settings.rate_window) == (
        32,
        32,
        60.0,
    )
    assert (settings.auth_max_failures, settings.harvest_min_unknown) == (5, 5)
    assert settings.exempt_relay_networks


@pytest.mark.parametrize(
    ("options", "key", "problem"),
    [
        ("error_ratio = 2.0", "error_ratio", "between 0 and 1"),
        ('rate_window = "2h"', "rate_window", "at most 3600"),
        ("rate_window = 0", "rate_window", "more than 0"),
        ("max_sessions = -1", "max_sessions", "0 (no limit) or more"),
        ('auth_lockout = "soon"', "auth_lockout", "duration"),
        ('exempt_relay_networks = "yes"', "exempt_relay_networks", "true or false"),
    ],
)
def test_a_bad_option_names_its_key_and_line(options: str, key: str, problem: str) -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        build(options)
    message = str(raised.value)
    assert f"filters.limits.{key}" in message and problem in message
    assert "line 4" in message


# --- at CONNECT --------------------------------------------------------------------------


def test_more_concurrent_sessions_than_allowed_from_one_address_are_told_to_come_back() -> None:
    limits, _ = build("max_connections_per_ip = 3")
    sessions = [client(port=40000 + n) for n in range(4)]
    assert [connect(limits, s) for s in sessions[:3]] == [CONTINUE] * 3
    verdict = connect(limits, sessions[3])
    assert is_cut_off(verdict, "too many connections from [192.0.2.1]")
    assert connect(limits, client("192.0.2.2")) == CONTINUE  # another client is served
    limits.session_closed(sessions[3], {})  # the refused one goes
    assert connect(limits, client(port=40010)).action is Action.DEFER  # still three open
    limits.session_closed(client(port=40010), {})
    limits.session_closed(sessions[0], {"commands": 3})
    assert connect(limits, client(port=40011)) == CONTINUE


def test_more_connections_per_minute_than_allowed_are_told_to_come_back() -> None:
    limits, clock = build("max_connection_rate = 5")
    for number in range(5):
        session = client(port=40000 + number)
        assert connect(limits, session) == CONTINUE
        limits.session_closed(session, {"commands": 4})
        clock.advance(10)
    assert is_cut_off(connect(limits, client(port=40100)), "in 60 s")  # at 50 s
    limits.session_closed(client(port=40100), {})
    clock.advance(11)  # 61 s: the first has left the minute, but the refused attempt counts
    assert connect(limits, client(port=40101)).action is Action.DEFER
    limits.session_closed(client(port=40101), {})
    clock.advance(20)  # 81 s: four in the last minute
    assert connect(limits, client(port=40102)) == CONTINUE


def test_a_client_whose_recent_sessions_were_mostly_errors_is_told_to_come_back() -> None:
    limits, clock = build("error_min = 10\nerror_ratio = 0.5")
    first, second = client(port=40000), client(port=40001)
    connect(limits, first)
    limits.session_closed(first, {"errors": 9, "commands": 10})
    assert connect(limits, second) == CONTINUE  # 9 errors: under the minimum
    limits.session_closed(second, {"errors": 1, "commands": 1})
    verdict = connect(limits, client(port=40002))
    assert is_cut_off(verdict, "too many errors from your address")
    limits.session_closed(client(port=40002), {"errors": 1})
    clock.advance(601)  # the error window is 10 minutes
    assert connect(limits, client(port=40003)) == CONTINUE


def test_many_errors_among_many_more_commands_are_fine() -> None:
    limits, _ = build("error_min = 10\nerror_ratio = 0.5")
    session = client()
    connect(limits, session)
    limits.session_closed(session, {"errors": 30, "commands": 100})
    assert connect(limits, client(port=40001)) == CONTINUE


def test_more_sessions_in_total_than_allowed_are_told_to_come_back() -> None:
    limits, _ = build("max_sessions = 3")
    for number in range(1, 4):
        assert connect(limits, client(f"192.0.2.{number}")) == CONTINUE
    assert is_cut_off(connect(limits, client("192.0.2.4")), "too many connections")


def test_a_limit_of_zero_is_no_limit() -> None:
    limits, _ = build("max_connections_per_ip = 0\nmax_connection_rate = 0\nmax_sessions = 0")
    assert all(connect(limits, client(port=40000 + n)) == CONTINUE for n in range(100))


def test_only_sessions_it_counted_are_counted_down() -> None:
    anvil_clock = Clock()
    anvil = Anvil(anvil_clock)
    limits, _ = build("max_connections_per_ip = 2", anvil=anvil)
    connect(limits, client(port=1))
    connect(limits, client(port=2))
    limits.session_closed(client(port=3), {})  # never counted (a chain without limits)
    limits.session_closed(client(port=1), {})
    limits.session_closed(client(port=1), {})  # told twice
    assert anvil.table.clients["192.0.2.1"].concurrent == 1


def test_clients_in_relay_networks_are_neither_counted_nor_limited() -> None:
    anvil = Anvil(Clock())
    limits, _ = build("max_connections_per_ip = 1", anvil=anvil)
    internal = [client("10.0.0.5", port=n, may_relay=True) for n in range(3)]
    assert [connect(limits, s) for s in internal] == [CONTINUE] * 3
    assert ask(limits, Stage.RCPT, internal[0], unknown_recipients=50) == CONTINUE
    assert "10.0.0.5" not in anvil.table.clients


def test_relay_networks_can_be_limited_too() -> None:
    limits, _ = build("max_connections_per_ip = 1\nexempt_relay_networks = false")
    connect(limits, client("10.0.0.5", port=1, may_relay=True))
    assert connect(limits, client("10.0.0.5", port=2, may_relay=True)).action is Action.DEFER


# --- at MAIL and RCPT ----------------------------------------------------------------------


def test_directory_harvesting_ends_the_session() -> None:
    limits, _ = build()
    verdict = ask(limits, Stage.RCPT, unknown_recipients=5, recipients=2)
    assert is_cut_off(verdict, "too many unknown recipients")


@pytest.mark.parametrize(
    ("unknown", "recipients"),
    [(4, 0), (5, 5), (50, 60)],
    ids=["under the minimum", "half unknown", "a big list with some gone"],
)
def test_some_unknown_recipients_are_not_harvesting(unknown: int, recipients: int) -> None:
    limits, _ = build()
    assert ask(limits, Stage.RCPT, unknown_recipients=unknown, recipients=recipients) == CONTINUE


def test_too_many_rsets_end_the_session_at_the_next_mail_or_rcpt() -> None:
    limits, _ = build("max_rset = 20")
    assert is_cut_off(ask(limits, Stage.MAIL, rset=21), "too many RSET")
    assert is_cut_off(ask(limits, Stage.RCPT, rset=21), "too many RSET")
    assert ask(limits, Stage.MAIL, rset=20) == CONTINUE


def test_a_client_that_resets_before_each_of_its_messages_is_fine() -> None:
    limits, _ = build("max_rset = 20")
    assert ask(limits, Stage.MAIL, rset=120, messages=100) == CONTINUE


# --- AUTH --------------------------------------------------------------------------------


def failures(limits: Limits, session: Session, count: int) -> list[float]:
    return [limits.auth_result(session, "alice", False) for _ in range(count)]


def test_auth_failures_wait_longer_each_time_and_lock_the_address_out() -> None:
    limits, clock = build('auth_delay = "1s"\nauth_max_delay = "6s"')
    session = client()
    assert settled(limits.auth_allowed(session)) == CONTINUE
    assert failures(limits, session, 5) == [1.0, 2.0, 4.0, 6.0, 6.0]
    verdict = settled(limits.auth_allowed(client(port=40001)))
    assert verdict.action is Action.DEFER
    assert (verdict.code, verdict.enhanced) == (454, "4.7.0")
    assert "too many AUTH failures from [192.0.2.1]" in verdict.reason
    assert settled(limits.auth_allowed(client("192.0.2.2"))) == CONTINUE
    clock.advance(3599)
    assert settled(limits.auth_allowed(session)).action is Action.DEFER
    clock.advance(1)  # the lockout is an hour
    assert settled(limits.auth_allowed(session)) == CONTINUE


def test_failures_spread_over_more_than_the_window_do_not_lock_out() -> None:
    limits, clock = build('auth_window = "10m"')
    for _ in range(8):
        limits.auth_result(client(), "alice", False)
        clock.advance(200)  # three at most in any 10 minutes
    assert settled(limits.auth_allowed(client())) == CONTINUE


def test_auth_failures_add_up_across_processes() -> None:
    """Two workers' filters share the main process's anvil."""
    shared = Anvil(Clock())
    first, _ = build(anvil=shared)
    second, _ = build(anvil=shared)
    failures(first, client(port=1), 3)
    failures(second, client(port=2), 2)
    assert settled(first.auth_allowed(client(port=3))).action is Action.DEFER


def test_successes_wait_nothing_and_relay_networks_are_never_locked_out() -> None:
    limits, _ = build()
    assert limits.auth_result(client(), "alice", True) == 0.0
    internal = client("10.0.0.5", may_relay=True)
    assert failures(limits, internal, 10) == [0.0] * 10
    assert settled(limits.auth_allowed(internal)) == CONTINUE


# --- when the anvil cannot be asked ----------------------------------------------------------


class UnreachableAnvil:
    """The main process is gone: every question fails without leaving the worker."""

    def __init__(self) -> None:
        self.disconnects = 0

    def connect(self, *args: Any) -> Deferred[Any]:
        return fail(AnvilNotAsked("cannot reach the anvil at /x/anvil.sock"))

    def disconnect(self, *args: Any) -> Deferred[Any]:
        self.disconnects += 1
        return fail(AnvilNotAsked("cannot reach the anvil"))

    auth_status = auth_failed = connect


def test_without_the_anvil_a_connection_gets_the_failure_verdict() -> None:
    anvil = UnreachableAnvil()
    limits, _ = build(anvil=anvil)
    runner = ChainRunner({Direction.INBOUND: (Link(limits),)}, Clock())
    outcomes: list[Any] = []
    runner.run(Request(Stage.CONNECT, Direction.INBOUND, client())).addCallback(outcomes.append)
    verdict = outcomes[0].verdict
    assert (verdict.action, verdict.enhanced) == (Action.DEFER, "4.3.0")  # the default failure verdict
    limits.session_closed(client(), {})
    assert anvil.disconnects == 0  # nothing was counted, so nothing is counted down


class LateAnvil(Anvil):
    """Counts at once, answers when the test says (a main process under load)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.answers: list[tuple[Deferred[Any], Any]] = []

    def connect(self, *args: Any) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self.answers.append((answer, self.table.connect(*args)))
        return answer


def test_a_session_counted_after_its_check_timed_out_is_still_counted_down() -> None:
    anvil = LateAnvil(Clock())
    limits, _ = build(anvil=anvil)
    chain_clock = Clock()
    runner = ChainRunner({Direction.INBOUND: (Link(limits, timeout=2.0),)}, chain_clock)
    outcomes: list[Any] = []
    runner.run(Request(Stage.CONNECT, Direction.INBOUND, client())).addCallback(outcomes.append)
    chain_clock.advance(2)
    assert outcomes[0].verdict.action is Action.DEFER  # timed out: the failure verdict
    answer, counts = anvil.answers[0]
    answer.callback(counts)  # too late, but the anvil counted the session
    limits.session_closed(client(), {"errors": 1})
    assert anvil.table.sessions == 0


def test_without_the_anvil_auth_is_refused_for_now() -> None:
    limits, _ = build(anvil=UnreachableAnvil())
    verdict = settled(limits.auth_allowed(client()))
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 454, "4.3.0")
    assert limits.auth_result(client(), "alice", False) == 1.0  # the failure still waits


# --- as a client sees it -----------------------------------------------------------------------


class Client(Dialogue):
    """A Dialogue from its own source port (sessions are told apart by address and port)."""

    def __init__(self, gateway: Gateway, port: int, peer: str = "192.0.2.1", **kwargs: Any) -> None:
        self.clock = Clock()
        self.reception = gateway.reception  # type: ignore[assignment]
        self.factory = SmtpServerFactory(
            kwargs.pop("settings", SETTINGS),
            gateway.reception,
            clock=self.clock,
            listener="tcp:25",
            **kwargs,
        )
        self.protocol = self.factory.buildProtocol(None)
        self.transport = TlsCapableTransport(peerAddress=IPv4Address("TCP", peer, port))
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.greeting = self.take()

    def hang_up(self) -> None:
        self.protocol.connectionLost()


def test_the_fourth_connection_from_an_address_gets_421_and_is_closed() -> None:
    limits, _ = build("max_connections_per_ip = 3")
    gateway = Gateway(limits)
    clients = [Client(gateway, port) for port in (40001, 40002, 40003)]
    assert all(c.greeting == ["220 mx.test ESMTP MailGate"] for c in clients)
    fourth = Client(gateway, 40004)
    assert fourth.greeting == ["421 4.7.0 Error: too many connections from [192.0.2.1], try again later"]
    assert fourth.closed
    fourth.hang_up()
    clients[0].ask("QUIT")
    clients[0].hang_up()
    assert Client(gateway, 40005).greeting == ["220 mx.test ESMTP MailGate"]


def test_a_harvester_is_cut_off_after_five_unknown_recipients() -> None:
    def validate(request: Any) -> Verdict:
        if request.recipient.address.startswith("known"):
            return CONTINUE
        return Verdict.reject("Recipient address rejected: User unknown", 550, "5.1.1")

    limits, _ = build()
    gateway = Gateway(limits, StaticFilter("recipients", {Stage.RCPT: validate}))
    dialogue = Client(gateway, 40001)
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org>")[0].startswith("250")
    assert dialogue.ask("RCPT TO:<known@example.com>")[0].startswith("250")
    for name in ("adam", "anna", "bert", "bob", "carl"):
        assert dialogue.ask(f"RCPT TO:<{name}@example.com>")[0].startswith("550 5.1.1")
    assert dialogue.ask("RCPT TO:<dave@example.com>") == [
        "421 4.7.0 Error: too many unknown recipients from [192.0.2.1], try again later"
    ]
    assert dialogue.closed


def test_a_password_guesser_waits_longer_and_is_locked_out() -> None:
    limits, _ = build()
    gateway = Gateway(limits)
    settings = attrs.evolve(SETTINGS, auth_requires_tls=False, max_auth_failures=10)
    dialogue = Client(gateway, 40001, tls_context=object(), credentials=credentials(), settings=settings)
    dialogue.ehlo()
    for delay in (1, 2, 4, 8, 16):
        assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0guess")) == []  # the answer waits
        dialogue.clock.advance(delay - 0.5)
        assert dialogue.take() == []
        dialogue.clock.advance(0.5)
        assert dialogue.take() == ["535 5.7.8 Authentication credentials invalid"]
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret")) == [
        "454 4.7.0 Error: too many AUTH failures from [192.0.2.1], try again later"
    ]
