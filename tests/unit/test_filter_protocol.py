"""The "protocol" filter: pregreet with its pass cache, improper pipelining, null-sender rules."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway import config as configuration
from gateway.filters import FilterServices, Request
from gateway.filters.protocol import HEADER, PassCache, Protocol
from gateway.interfaces import IFilter, ISessionObserver
from gateway.model import CONTINUE, Action, Direction, Envelope, Recipient, Session, Stage, Verdict

from .test_filter_limits import Client
from .test_smtp_server_filters import Gateway


def build(options: str = "", filters: str = "") -> tuple[Protocol, Clock]:
    text = f'[filters]\ninbound = ["protocol"]\n{filters}\n[filters.protocol]\n{options}\n'
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    clock = Clock()
    clock.advance(1_700_000_000)
    section = cfg.filters.section(cfg.source, "protocol")
    section.take("timeout", object, None)  # as the registry does before from_config
    protocol = Protocol.from_config(section, FilterServices(cfg, clock))
    section.done()
    return protocol, clock


def client(host: str = "192.0.2.1", port: int = 40000, **kwargs: Any) -> Session:
    return Session(peer_host=host, peer_port=port, listener="tcp:25", **kwargs)


def ask(
    protocol: Protocol,
    stage: Stage,
    session: Session | None = None,
    envelope: Envelope | None = None,
    direction: Direction = Direction.INBOUND,
) -> Verdict | Deferred[Verdict]:
    return protocol.check(Request(stage, direction, session or client(), envelope))


def greet(protocol: Protocol, clock: Clock, session: Session) -> float:
    """Run the connect stage; the seconds the banner waited."""
    answer = ask(protocol, Stage.CONNECT, session)
    if isinstance(answer, Verdict):
        assert answer == CONTINUE
        return 0.0
    found: list[Any] = []
    answer.addCallback(found.append)
    waited = 0.0
    while not found:
        clock.advance(0.5)
        waited += 0.5
    assert found == [CONTINUE]
    return waited


def envelope(sender: str, *recipients: str) -> Envelope:
    return Envelope(sender, tuple(Recipient(r) for r in recipients))


# --- configuration -----------------------------------------------------------------------


def test_provides_the_filter_and_observer_interfaces() -> None:
    protocol, _ = build()
    assert verifyObject(IFilter, protocol)
    assert verifyObject(ISessionObserver, protocol)


def test_a_greet_wait_as_long_as_the_filter_timeout_is_refused_at_start() -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        build('greet_wait = "30s"\ntimeout = "30s"')
    assert "filters.protocol.greet_wait" in str(raised.value)
    assert "shorter than the filter's timeout (30 s)" in str(raised.value)
    with pytest.raises(configuration.ConfigError):
        build('greet_wait = "10s"', filters='timeout = "8s"')  # the chain-wide timeout
    build('greet_wait = "10s"\ntimeout = "12s"', filters='timeout = "8s"')  # its own timeout


def test_it_acts_only_at_the_stages_its_settings_have_something_to_check() -> None:
    assert build()[0].stages == {Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT}  # the defaults
    assert build("greet_wait = 0")[0].stages == {Stage.HELO, Stage.MAIL, Stage.RCPT}  # no wait: no CONNECT
    quiet, _ = build('greet_wait = 0\nmulti_recipient_bounce = "accept"')
    assert quiet.stages == {Stage.HELO, Stage.MAIL}
    # pregreet and improper pipelining are still refused, whatever the stages
    assert ask(quiet, Stage.MAIL, client(pregreet=True)).action is Action.REJECT  # type: ignore[union-attr]
    assert ask(quiet, Stage.MAIL, client(improper_pipelining=True)).action is Action.REJECT  # type: ignore[union-attr]


def test_a_bad_action_names_its_key_and_choices() -> None:
    with pytest.raises(configuration.ConfigError) as raised:
        build('pregreet_action = "shout"')
    assert "filters.protocol.pregreet_action" in str(raised.value)
    assert "reject, drop, tag" in str(raised.value)


# --- pregreet and the pass cache ------------------------------------------------------------


def test_the_banner_waits_greet_wait_for_a_new_client() -> None:
    protocol, clock = build('greet_wait = "6s"')
    assert greet(protocol, clock, client()) == 6.0


def test_a_client_that_waited_and_said_helo_skips_the_wait_until_pass_ttl() -> None:
    protocol, clock = build('greet_wait = "6s"\npass_ttl = "1d"')
    first = client(port=40000)
    greet(protocol, clock, first)
    assert ask(protocol, Stage.HELO, attrs.evolve(first, helo="mx.example")) == CONTINUE
    protocol.session_closed(first, {})
    assert greet(protocol, clock, client(port=40001)) == 0.0
    assert greet(protocol, clock, client("192.0.2.2")) == 6.0  # another client waits
    clock.advance(86400)
    assert greet(protocol, clock, client(port=40002)) == 6.0


def test_a_client_that_left_before_helo_waits_again() -> None:
    protocol, clock = build()
    session = client()
    greet(protocol, clock, session)
    protocol.session_closed(session, {})
    assert greet(protocol, clock, client(port=40001)) == 6.0


def test_an_early_talker_is_refused_at_helo_and_mail_and_never_passes() -> None:
    protocol, clock = build()
    talker = client(pregreet=True)
    greet(protocol, clock, talker)
    for stage in (Stage.HELO, Stage.MAIL):
        verdict = ask(protocol, stage, talker, envelope("a@example.org"))
        assert verdict == Verdict.reject("Protocol error: talked before the greeting", 554, "5.5.1")
    assert greet(protocol, clock, client(port=40001)) == 6.0


def test_a_passed_client_that_talks_early_loses_its_pass() -> None:
    protocol, clock = build()
    greet(protocol, clock, client())
    ask(protocol, Stage.HELO, client())
    assert greet(protocol, clock, client(port=40001)) == 0.0
    ask(protocol, Stage.HELO, client(port=40001, pregreet=True))
    assert greet(protocol, clock, client(port=40002)) == 6.0


def test_pregreet_drop_ends_the_session_and_tag_marks_the_messages() -> None:
    dropper, _ = build('pregreet_action = "drop"')
    verdict = ask(dropper, Stage.HELO, client(pregreet=True))
    assert isinstance(verdict, Verdict)
    assert (verdict.action, verdict.code) == (Action.DEFER, 421)
    tagger, _ = build('pregreet_action = "tag"')
    assert ask(tagger, Stage.HELO, client(pregreet=True)) == CONTINUE  # tagged once, at MAIL
    verdict = ask(tagger, Stage.MAIL, client(pregreet=True), envelope("a@example.org"))
    assert isinstance(verdict, Verdict)
    assert verdict.action is Action.TAG and verdict.headers == ((HEADER, "pregreet"),)


def test_no_greet_wait_means_no_wait() -> None:
    protocol, _ = build("greet_wait = 0")
    assert ask(protocol, Stage.CONNECT) == CONTINUE


def test_the_pass_cache_is_bounded_and_forgets_expired_entries() -> None:
    clock = Clock()
    cache = PassCache(clock, ttl=100, size=3)
    for number in range(1, 5):
        cache.add(f"192.0.2.{number}")
        clock.advance(10)
    assert len(cache) == 3
    assert not cache.holds("192.0.2.1")
    assert cache.holds("192.0.2.2")
    clock.advance(75)  # .2 was added at 10: 110 > 100
    assert not cache.holds("192.0.2.2") and cache.holds("192.0.2.3")
    clock.advance(100)
    cache.add("192.0.2.9")  # adding trims what has expired
    assert len(cache) == 1


# --- improper pipelining ----------------------------------------------------------------------


def test_commands_sent_ahead_without_pipelining_are_refused_at_mail() -> None:
    protocol, _ = build()
    rushed = client(improper_pipelining=True)
    assert ask(protocol, Stage.HELO, rushed) == CONTINUE
    verdict = ask(protocol, Stage.MAIL, rushed, envelope("a@example.org"))
    assert verdict == Verdict.reject("Improper use of SMTP command pipelining", 503, "5.5.0")
    assert ask(protocol, Stage.MAIL, client(), envelope("a@example.org")) == CONTINUE


# --- the null sender --------------------------------------------------------------------------


def test_a_bounce_gets_one_recipient_and_the_others_are_told_to_come_separately() -> None:
    protocol, _ = build()
    assert ask(protocol, Stage.RCPT, envelope=envelope("")) == CONTINUE  # the first recipient
    verdict = ask(protocol, Stage.RCPT, envelope=envelope("", "first@example.com"))
    assert isinstance(verdict, Verdict)
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 452, "4.5.3")
    assert ask(protocol, Stage.RCPT, envelope=envelope("a@example.org", "b@example.com")) == CONTINUE


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("reject", Verdict.reject("Error: multi-recipient bounce", 550, "5.5.3")),
        ("accept", CONTINUE),
    ],
)
def test_multi_recipient_bounce_choices(choice: str, expected: Verdict) -> None:
    protocol, _ = build(f'multi_recipient_bounce = "{choice}"')
    assert ask(protocol, Stage.RCPT, envelope=envelope("", "a@example.com")) == expected


def test_the_null_sender_may_be_refused_from_authenticated_users() -> None:
    protocol, _ = build('outbound_null_sender = "reject-authenticated"')
    user = client(authenticated_user="alice", may_relay=True)
    bounce = envelope("")
    verdict = ask(protocol, Stage.MAIL, user, bounce, Direction.OUTBOUND)
    assert isinstance(verdict, Verdict) and (verdict.action, verdict.code) == (Action.REJECT, 550)
    server = client("10.0.0.5", may_relay=True)  # an internal server's bounce goes out
    assert ask(protocol, Stage.MAIL, server, bounce, Direction.OUTBOUND) == CONTINUE
    assert ask(protocol, Stage.MAIL, user, bounce, Direction.INBOUND) == CONTINUE
    strict, _ = build('outbound_null_sender = "reject"')
    assert ask(strict, Stage.MAIL, server, bounce, Direction.OUTBOUND).action is Action.REJECT  # type: ignore[union-attr]
    default, _ = build()
    assert ask(default, Stage.MAIL, user, bounce, Direction.OUTBOUND) == CONTINUE


# --- as a client sees it -----------------------------------------------------------------------


def test_an_early_talker_gets_the_banner_late_and_its_helo_refused() -> None:
    protocol, clock = build()
    gateway = Gateway(protocol)
    talker = Client(gateway, 40001)
    assert talker.greeting == []
    talker.send(b"EHLO spam.example\r\n")
    clock.advance(6)
    assert talker.take() == [
        "220 mx.test ESMTP MailGate",
        "554 5.5.1 Protocol error: talked before the greeting",
    ]
    assert talker.ask("MAIL FROM:<a@example.org>") == ["503 5.5.1 Error: send HELO/EHLO first"]


def test_a_polite_client_waits_once() -> None:
    protocol, clock = build()
    gateway = Gateway(protocol)
    polite = Client(gateway, 40001)
    clock.advance(6)
    assert polite.take() == ["220 mx.test ESMTP MailGate"]
    assert polite.ehlo()[0].startswith("250-mx.test")
    assert polite.ask("QUIT")[0].startswith("221")
    polite.protocol.connectionLost()
    assert Client(gateway, 40002).greeting == ["220 mx.test ESMTP MailGate"]  # at once


def test_a_bounce_to_two_recipients_delivers_the_first_and_defers_the_second() -> None:
    protocol, _ = build("greet_wait = 0")
    dialogue = Client(Gateway(protocol), 40001)
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<>")[0].startswith("250")
    assert dialogue.ask("RCPT TO:<first@example.com>")[0].startswith("250")
    assert dialogue.ask("RCPT TO:<second@example.com>") == [
        "452 4.5.3 Error: a bounce (MAIL FROM:<>) has one recipient; send the others separately"
    ]
    assert not dialogue.closed
