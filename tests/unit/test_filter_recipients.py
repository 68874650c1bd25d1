"""The "recipients" filter: static lists, cached SMTP callouts, accept-all, and the catch-all.

Callouts are read as dialogues: `Wire` is the connection to the internal
server, `said()` takes what the gateway wrote, `answer()` feeds the server's
reply. Time is a `Clock`: no test sleeps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway import config as configuration
from gateway.config import ConfigError
from gateway.filters import FilterServices, Request, registry
from gateway.filters._callout import QUEUE_PER_SESSION, CalloutServer, SmtpProber
from gateway.filters._directory import Answer, Lookup, parse_entry
from gateway.filters._listfile import strip_comment
from gateway.filters._verify_cache import AddressVerifier
from gateway.filters.recipients import CalloutDirectory, Recipients
from gateway.model import Action, Direction, Envelope, Recipient, Session, Stage, Verdict
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.smtp._client_protocol import ClientFactory, ClientProtocol

T = TypeVar("T")

BASE = """
[gateway]
hostname = "gw.example.com"
state_dir = "/nonexistent"
[relay]
domains = ["example.com", "example.org", "*.example.net"]
[[routes]]
match = "example.com"
transport = "smtp:[192.0.2.10]:2525, smtp:[192.0.2.11]:25"
[[routes]]
match = "example.org"
transport = "lmtp:[192.0.2.20]:24"
[[routes]]
match = "*"
transport = "mx"
[filters]
inbound = ["recipients"]
[filters.recipients]
"""

SESSION = Session("203.0.113.5")
ENVELOPE = Envelope("someone@outside.test", ())
UNKNOWN = "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"
EHLO = b"250-exchange.example.com\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"
EHLO_PLAIN = b"250-exchange.example.com\r\n250 SIZE 1000000\r\n"


def result_of(deferred: Deferred[T] | T) -> T:
    """The result a Deferred has already (an AssertionError if it has none yet)."""
    if not isinstance(deferred, Deferred):
        return deferred
    found: list[Any] = []
    deferred.addBoth(found.append)
    assert found, "the Deferred has not fired"
    if isinstance(found[0], Failure):
        found[0].raiseException()
    return found[0]  # type: ignore[no-any-return]


def services_for(options: str, reactor: Any = None, source: str = "mailgate.toml") -> FilterServices:
    cfg = configuration.parse(BASE + options, source, base_dir="/")
    return FilterServices(cfg, reactor if reactor is not None else Clock())


def build(options: str, reactor: Any = None, source: str = "mailgate.toml") -> Recipients:
    services = services_for(options, reactor, source)
    section = services.config.filters.section(source, "recipients")
    built = Recipients.from_config(section, services)
    section.done()
    return built


def error_of(options: str, source: str = "mailgate.toml") -> str:
    with pytest.raises(ConfigError) as raised:
        build(options, source=source)
    return str(raised.value)


def rcpt(address: str, direction: Direction = Direction.INBOUND) -> Request:
    return Request(Stage.RCPT, direction, SESSION, ENVELOPE, Recipient(address))


def reply_of(verdict: Verdict) -> str:
    """The verdict as the SMTP client would read it."""
    from gateway.filters.chain import Outcome
    from gateway.reception import refusal

    reply = refusal(Outcome(verdict), Stage.RCPT)
    return "250 ok" if reply is None else str(reply)


# -- static lists -----------------------------------------------------------------------------------


def test_static_list_accepts_listed_addresses_and_refuses_the_rest_with_5_1_1() -> None:
    recipients = build('mode = "static"\naddresses = ["Alice@Example.com", "@example.org"]\n')
    assert result_of(recipients.check(rcpt("alice@example.com"))).action is Action.CONTINUE
    assert result_of(recipients.check(rcpt("ALICE@EXAMPLE.COM"))).action is Action.CONTINUE
    assert result_of(recipients.check(rcpt("anyone@example.org"))).action is Action.CONTINUE
    refused = result_of(recipients.check(rcpt("nobody@example.com")))
    assert reply_of(refused) == UNKNOWN
    # "@example.org" is that domain, not its sub-domains
    assert result_of(recipients.check(rcpt("x@sub.example.net"))).action is Action.REJECT


def test_recipients_of_other_domains_and_outbound_mail_are_left_alone() -> None:
    recipients = build('mode = "static"\naddresses = ["alice@example.com"]\n')
    assert result_of(recipients.check(rcpt("bob@elsewhere.test"))).action is Action.CONTINUE
    assert result_of(recipients.check(rcpt("postmaster"))).action is Action.CONTINUE
    outbound = rcpt("nobody@example.com", Direction.OUTBOUND)
    assert result_of(recipients.check(outbound)).action is Action.CONTINUE
    assert recipients.stages == frozenset({Stage.RCPT})


def test_list_files_with_comments_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text(
        "# staff\nalice@example.com   # the boss\n\n  bob@example.com\n@example.org\nx#y@example.com\n"
    )
    config_file = tmp_path / "mailgate.toml"
    config_file.write_text("")
    recipients = build('mode = "static"\nfiles = ["users.txt"]\n', source=str(config_file))
    for address in ("alice@example.com", "bob@example.com", "carol@example.org", "x#y@example.com"):
        assert result_of(recipients.check(rcpt(address))).action is Action.CONTINUE, address
    assert result_of(recipients.check(rcpt("the@example.com"))).action is Action.REJECT


def test_a_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("alice@example.com\n# fine\nnot-an-address\n")
    message = error_of(f'mode = "static"\nfiles = ["{users}"]\n')
    assert message.startswith(f"{users}, line 3: ")
    assert "'not-an-address' is not an address" in message
    users.write_text("alice@example.com bob@example.com\n")
    assert error_of(f'mode = "static"\nfiles = ["{users}"]\n').startswith(f"{users}, line 1: one address")
    missing = tmp_path / "missing.txt"
    assert "cannot read the recipient list" in error_of(f'mode = "static"\nfiles = ["{missing}"]\n')


def test_reload_reads_the_files_again_and_keeps_the_old_list_on_error(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("alice@example.com\n")
    recipients = build(f'mode = "static"\nfiles = ["{users}"]\n')
    assert result_of(recipients.check(rcpt("bob@example.com"))).action is Action.REJECT
    users.write_text("alice@example.com\nbob@example.com\n")
    recipients.reload()
    assert result_of(recipients.check(rcpt("bob@example.com"))).action is Action.CONTINUE
    users.write_text("alice@example.com\nbad line here\n")
    with pytest.raises(ConfigError, match=r"users.txt, line 2: "):
        recipients.reload()
    # the old list still holds
    assert result_of(recipients.check(rcpt("bob@example.com"))).action is Action.CONTINUE
    users.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        recipients.reload()
    assert result_of(recipients.check(rcpt("alice@example.com"))).action is Action.CONTINUE


@given(st.text(max_size=60))
def test_any_list_line_is_an_entry_or_a_readable_error(line: str) -> None:
    text = strip_comment(line)
    try:
        key, domain = parse_entry(text)
    except ValueError as error:
        assert "is not an address" in str(error)
    else:
        assert key == key.lower() and ("@" not in key) is domain


@given(
    st.from_regex(r"[a-z0-9][a-z0-9._+=-]{0,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)
def test_a_listed_address_is_found_however_it_is_written(local: str, domain: str) -> None:
    from gateway.filters._directory import RecipientList

    found = RecipientList([f"{local.upper()}@{domain}"]).lookup(f"{local}@{domain.upper()}.")
    assert found.answer is Answer.VALID


# -- the catch-all ----------------------------------------------------------------------------------


def test_catch_all_redirects_unknown_recipients_and_lets_known_ones_through() -> None:
    recipients = build(
        'mode = "static"\naddresses = ["alice@example.com"]\ncatch_all = "postmaster@example.com"\n'
    )
    assert result_of(recipients.check(rcpt("alice@example.com"))).action is Action.CONTINUE
    verdict = result_of(recipients.check(rcpt("nobody@example.com")))
    assert verdict.action is Action.REDIRECT and verdict.target == "postmaster@example.com"
    assert "<nobody@example.com>" in verdict.reason  # the log keeps the original recipient
    assert reply_of(verdict) == "250 ok"


def test_catch_all_mail_is_queued_for_the_catch_all_with_the_original_recipient_as_orcpt() -> None:
    recipients = build(
        'mode = "static"\naddresses = ["alice@example.com"]\ncatch_all = "postmaster@example.com"\n'
    )
    from gateway.filters.chain import ChainRunner, Link

    spool = MemorySpool()
    runner = ChainRunner({Direction.INBOUND: (Link(recipients),)}, Clock())
    reception = Reception(spool, configuration.parse(BASE, "t").relay, runner)
    checks = reception.open_session(SESSION)
    envelope = Envelope("someone@outside.test", ())
    assert result_of(checks.mail(SESSION, envelope)) is None
    for address in ("alice@example.com", "nobody@example.com", "ghost@example.com"):
        assert result_of(checks.rcpt(SESSION, envelope, Recipient(address))) is None
        envelope = Envelope(envelope.mail_from, (*envelope.rcpt_to, Recipient(address)))
    message = checks.new_message(SESSION)
    message.write(b"Subject: hi\r\n\r\nhello\r\n")
    assert result_of(checks.accept(SESSION, envelope, message)).code == 250
    [queue_id] = spool.list("incoming") or spool.list("active")
    queued = spool.load(queue_id).envelope.rcpt_to
    # one copy for the catch-all, however many unknown users it stands in for
    assert [r.address for r in queued] == ["alice@example.com", "postmaster@example.com"]
    assert queued[1].orcpt == "rfc822;nobody@example.com"
    assert checks.unknown_recipients == 0  # nobody was refused: a harvester learns nothing


def test_an_unknown_recipient_counts_for_harvest_protection() -> None:
    recipients = build('mode = "static"\naddresses = ["alice@example.com"]\n')
    from gateway.filters.chain import ChainRunner, Link

    runner = ChainRunner({Direction.INBOUND: (Link(recipients),)}, Clock())
    reception = Reception(MemorySpool(), configuration.parse(BASE, "t").relay, runner)
    checks = reception.open_session(SESSION)
    refused = result_of(checks.rcpt(SESSION, ENVELOPE, Recipient("nobody@example.com")))
    assert str(refused) == UNKNOWN
    assert checks.counts()["unknown_recipients"] == 1


# -- accept-all, and config errors ------------------------------------------------------------------


def test_accept_all_accepts_every_recipient_of_our_domains() -> None:
    recipients = build('mode = "accept-all"\n')
    for address in ("anyone@example.com", "x@y.example.net", "z@example.org"):
        assert result_of(recipients.check(rcpt(address))).action is Action.CONTINUE


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ('mode = "static"\n', "filters.recipients.mode: static needs addresses or files"),
        ('mode = "static"\naddresses = ["bob"]\n', "filters.recipients.addresses: 'bob' is not an address"),
        ('mode = "static"\naddresses = ["a@b.c"]\nwait = "3s"\n', 'wait: is only used with mode = "callout"'),
        ('addresses = ["a@b.c"]\n', 'addresses: is only used with mode = "static" (mode is "callout")'),
        ('mode = "accept-all"\ncatch_all = "pm@example.com"\n', "catch_all: has no effect"),
        ('catch_all = "postmaster"\n', "catch_all: 'postmaster' is not an address"),
        ('server = "[192.0.2.1]:99999"\n', "server: port 99999 is out of range"),
        ('mode = "ldap"\n', "mode: must be one of callout, static, accept-all"),
        ('positive_ttl = "forever"\n', "positive_ttl: must be a duration"),
    ],
)
def test_config_errors_name_the_line_and_key(options: str, expected: str) -> None:
    message = error_of(options)
    assert message.startswith("mailgate.toml, line "), message
    assert expected in message


def test_callout_needs_a_route_with_a_server_for_each_of_our_domains() -> None:
    text = BASE.replace(
        'match = "example.org"\ntransport = "lmtp:[192.0.2.20]:24"', 'match = "example.org"\ntransport = "mx"'
    )
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    services = FilterServices(cfg, Clock())
    with pytest.raises(ConfigError) as raised:
        Recipients.from_config(cfg.filters.section("mailgate.toml", "recipients"), services)
    assert "callout needs a server to ask about example.org, but its route is 'mx'" in str(raised.value)
    # an explicit server answers for every domain
    cfg = configuration.parse(text + 'server = "[192.0.2.99]:25"\n', "mailgate.toml", base_dir="/")
    Recipients.from_config(cfg.filters.section("mailgate.toml", "recipients"), FilterServices(cfg, Clock()))


def test_the_registry_builds_it_from_the_chain_without_a_reactor() -> None:
    cfg = configuration.parse(BASE, "mailgate.toml", base_dir="/")
    runner = registry.build_runner(cfg, FilterServices(cfg, reactor=None))
    [link] = runner.chains[Direction.INBOUND]
    assert isinstance(link.filter, Recipients)
    assert "recipients" in registry.describe(runner)[1] and "stages=rcpt" in registry.describe(runner)[1]


# -- the callout cache ------------------------------------------------------------------------------


class ScriptedProber:
    """A prober whose callouts the test answers by hand (`answer()`); records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: dict[str, list[Deferred[Lookup]]] = {}

    def probe(self, address: str) -> Deferred[Lookup]:
        self.asked.append(address)
        deferred: Deferred[Lookup] = Deferred()
        self.pending.setdefault(address, []).append(deferred)
        return deferred

    def answer(self, address: str, answer: Answer, detail: str = "") -> None:
        for deferred in self.pending.pop(address):
            deferred.callback(Lookup(answer, detail))


def callout_filter(
    clock: Clock, prober: Any, catch_all: str = "", **options: Any
) -> tuple[Recipients, CalloutDirectory]:
    services = services_for("", clock)
    directory = CalloutDirectory(services, lambda server: prober, **options)
    return Recipients(directory, services.config.relay, catch_all), directory


def test_answers_are_cached_for_their_ttl() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober, positive_ttl=86400, negative_ttl=3600)
    pending = recipients.check(rcpt("alice@example.com"))
    prober.answer("alice@example.com", Answer.VALID)
    assert result_of(pending).action is Action.CONTINUE
    pending = recipients.check(rcpt("nobody@example.com"))
    prober.answer("nobody@example.com", Answer.UNKNOWN, "550 5.1.1 User unknown")
    assert reply_of(result_of(pending)) == UNKNOWN
    # from the cache: answered at once, no callout
    clock.advance(3599)
    assert recipients.check(rcpt("Alice@example.com")).action is Action.CONTINUE  # type: ignore[union-attr]
    assert recipients.check(rcpt("nobody@example.com")).action is Action.REJECT  # type: ignore[union-attr]
    assert prober.asked == ["alice@example.com", "nobody@example.com"]
    # the negative answer expires after an hour, the positive one after a day
    clock.advance(1)
    assert isinstance(recipients.check(rcpt("nobody@example.com")), Deferred)
    assert recipients.check(rcpt("alice@example.com")).action is Action.CONTINUE  # type: ignore[union-attr]
    clock.advance(86400 - 3600)
    assert isinstance(recipients.check(rcpt("alice@example.com")), Deferred)
    assert prober.asked == [
        "alice@example.com",
        "nobody@example.com",
        "nobody@example.com",
        "alice@example.com",
    ]


def test_concurrent_questions_about_one_address_share_one_callout() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober)
    first = recipients.check(rcpt("bob@example.com"))
    second = recipients.check(rcpt("BOB@example.com"))
    assert prober.asked == ["bob@example.com"]
    prober.answer("bob@example.com", Answer.UNKNOWN)
    assert result_of(first).action is result_of(second).action is Action.REJECT


def test_a_failed_callout_defers_with_450_4_1_1_and_is_not_cached() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober)
    pending = recipients.check(rcpt("carol@example.com"))
    prober.answer("carol@example.com", Answer.UNVERIFIED, "connect to [192.0.2.10]:2525: Connection refused")
    reply = reply_of(result_of(pending))
    assert reply == (
        "450 4.1.1 <carol@example.com>: Recipient address verification in progress, try again later"
    )
    assert "192.0.2.10" not in reply  # the inside stays inside
    assert isinstance(recipients.check(rcpt("carol@example.com")), Deferred)  # asked again
    assert prober.asked == ["carol@example.com"] * 2


def test_a_slow_callout_defers_the_client_and_its_answer_serves_the_retry() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober, wait=8)
    pending = recipients.check(rcpt("dave@example.com"))
    clock.advance(7.9)
    assert not pending.called  # type: ignore[union-attr]
    clock.advance(0.1)
    assert reply_of(result_of(pending)).startswith(
        "450 4.1.1 <dave@example.com>: Recipient address verification"
    )
    prober.answer("dave@example.com", Answer.VALID)  # the callout went on
    assert recipients.check(rcpt("dave@example.com")).action is Action.CONTINUE  # type: ignore[union-attr]
    assert prober.asked == ["dave@example.com"]


def test_catch_all_with_callouts_redirects_unknown_but_never_unverified() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober, catch_all="catchall@example.com")
    unknown = recipients.check(rcpt("nobody@example.com"))
    unverified = recipients.check(rcpt("maybe@example.com"))
    prober.answer("nobody@example.com", Answer.UNKNOWN)
    prober.answer("maybe@example.com", Answer.UNVERIFIED)
    assert result_of(unknown).target == "catchall@example.com"
    assert result_of(unverified).action is Action.DEFER


def test_a_prober_that_raises_is_unverified_never_an_exception() -> None:
    clock = Clock()

    def broken(address: str) -> Deferred[Lookup]:
        raise RuntimeError("bug")

    verifier = AddressVerifier(clock, broken)
    found = result_of(verifier.verify("a@example.com"))
    assert found.answer is Answer.UNVERIFIED
    verifier = AddressVerifier(clock, lambda address: fail(RuntimeError("bug")))
    assert result_of(verifier.verify("a@example.com")).answer is Answer.UNVERIFIED


def test_the_cache_is_bounded_least_recently_used_out_first() -> None:
    clock = Clock()
    asked: list[str] = []

    def valid(address: str) -> Deferred[Lookup]:
        asked.append(address)
        return succeed(Lookup(Answer.VALID))

    verifier = AddressVerifier(clock, valid, size=2)
    for address in ("a@x.test", "b@x.test", "a@x.test", "c@x.test", "a@x.test", "b@x.test"):
        verifier.verify(address)
    assert asked == ["a@x.test", "b@x.test", "c@x.test", "b@x.test"]  # b went when c came
    assert len(verifier.cache) == 2


def test_reload_forgets_unknown_addresses_but_not_valid_ones() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober)
    for address, answer in (("new@example.com", Answer.UNKNOWN), ("old@example.com", Answer.VALID)):
        recipients.check(rcpt(address))
        prober.answer(address, answer)
    recipients.reload()  # the administrator has just created new@
    assert isinstance(recipients.check(rcpt("new@example.com")), Deferred)
    assert not isinstance(recipients.check(rcpt("old@example.com")), Deferred)


# -- the callouts on the wire -----------------------------------------------------------------------


class Wire(StringTransport):
    """The connection to the internal server: closing it tells the protocol at once."""

    def __init__(self, protocol: ClientProtocol) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.protocol = protocol

    def said(self) -> bytes:
        written = self.value()
        self.clear()  # type: ignore[no-untyped-call]
        return written  # type: ignore[no-any-return]

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def loseConnection(self) -> None:
        if not self.protocol.closed:
            super().loseConnection()  # type: ignore[no-untyped-call]
            self.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[no-untyped-call]

    def abortConnection(self) -> None:
        self.loseConnection()


SERVER = CalloutServer("192.0.2.10", 2525)


class Callouts:
    """A `SmtpProber` whose connections are `Wire`s the test reads and answers."""

    def __init__(self, server: CalloutServer = SERVER, **options: Any) -> None:
        self.clock = Clock()
        self.wires: list[Wire] = []
        self.refuse = False
        self.prober = SmtpProber(server, self.clock, self.connect, helo_name="gw.example.com", **options)

    def connect(self, server: CalloutServer, factory: ClientFactory) -> Deferred[ClientProtocol]:
        if self.refuse:
            return fail(ConnectionRefusedError("Connection refused"))
        protocol = factory.buildProtocol(None)
        wire = Wire(protocol)
        protocol.makeConnection(wire)
        self.wires.append(wire)
        return succeed(protocol)

    @property
    def wire(self) -> Wire:
        return self.wires[-1]

    def greet(self, ehlo: bytes = EHLO, hello: bytes = b"EHLO") -> Wire:
        """Greeting and EHLO on the newest connection."""
        self.wire.answer(b"220 exchange.example.com ESMTP\r\n")
        assert self.wire.said() == hello + b" gw.example.com\r\n"
        self.wire.answer(ehlo)
        return self.wire


def test_a_callout_asks_mail_from_null_and_rcpt_pipelined() -> None:
    callouts = Callouts()
    found = callouts.prober.probe("alice@example.com")
    wire = callouts.greet()
    assert wire.said() == b"MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\n"
    wire.answer(b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n")
    lookup = result_of(found)
    assert lookup.answer is Answer.VALID
    assert (
        lookup.detail == "host [192.0.2.10]:2525 said: 250 2.1.5 Recipient OK (in reply to RCPT TO command)"
    )


@pytest.mark.parametrize(
    ("rcpt_reply", "answer"),
    [
        (b"550 5.1.1 <x@example.com>: Recipient address rejected: User unknown\r\n", Answer.UNKNOWN),
        (b"553 5.7.1 no such mailbox\r\n", Answer.UNKNOWN),
        (b"450 4.2.0 try later\r\n", Answer.UNVERIFIED),
        (b"421 4.3.2 shutting down\r\n", Answer.UNVERIFIED),
        (b"251 2.1.5 forwarded\r\n", Answer.VALID),
    ],
)
def test_the_rcpt_reply_decides(rcpt_reply: bytes, answer: Answer) -> None:
    callouts = Callouts()
    found = callouts.prober.probe("x@example.com")
    wire = callouts.greet()
    wire.said()
    wire.answer(b"250 2.1.0 Ok\r\n" + rcpt_reply)
    assert result_of(found).answer is answer


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    callouts = Callouts()
    found = callouts.prober.probe("alice@example.com")
    wire = callouts.greet(EHLO_PLAIN)
    assert wire.said() == b"MAIL FROM:<>\r\n"
    wire.answer(b"250 2.1.0 Ok\r\n")
    assert wire.said() == b"RCPT TO:<alice@example.com>\r\n"
    wire.answer(b"550 5.1.1 User unknown\r\n")
    assert result_of(found).answer is Answer.UNKNOWN


def test_a_server_refusing_the_null_sender_tells_nothing_about_users() -> None:
    callouts = Callouts()
    found = callouts.prober.probe("alice@example.com")
    wire = callouts.greet(EHLO_PLAIN)
    wire.said()
    wire.answer(b"553 5.7.1 null sender refused\r\n")
    assert wire.said() == b""  # no RCPT after a refused MAIL
    lookup = result_of(found)
    assert lookup.answer is Answer.UNVERIFIED and "MAIL FROM" in lookup.detail


def test_lmtp_servers_are_greeted_with_lhlo() -> None:
    callouts = Callouts(CalloutServer("192.0.2.20", 24, lmtp=True))
    found = callouts.prober.probe("alice@example.org")
    wire = callouts.greet(hello=b"LHLO")
    wire.said()
    wire.answer(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    assert result_of(found).answer is Answer.VALID


def test_the_session_is_kept_briefly_and_the_next_callout_starts_with_rset() -> None:
    callouts = Callouts(keep_open=5)
    first = callouts.prober.probe("alice@example.com")
    wire = callouts.greet()
    wire.said()
    wire.answer(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert result_of(first).answer is Answer.VALID
    assert wire.said() == b""  # no QUIT yet: kept for the next callout
    second = callouts.prober.probe("bob@example.com")
    assert len(callouts.wires) == 1
    assert wire.said() == b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.com>\r\n"
    wire.answer(b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n550 5.1.1 User unknown\r\n")
    assert result_of(second).answer is Answer.UNKNOWN
    callouts.clock.advance(5)
    assert wire.said() == b"QUIT\r\n"
    wire.answer(b"221 2.0.0 Bye\r\n")
    assert wire.protocol.closed and callouts.prober.idle == 0


def test_a_kept_session_the_server_closed_is_replaced() -> None:
    callouts = Callouts(keep_open=5)
    first = callouts.prober.probe("alice@example.com")
    wire = callouts.greet()
    wire.said()
    wire.answer(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    result_of(first)
    second = callouts.prober.probe("bob@example.com")
    wire.answer(b"421 4.4.2 idle too long\r\n")
    wire.loseConnection()
    assert len(callouts.wires) == 2  # asked again over a new session
    fresh = callouts.greet()
    assert fresh.said() == b"MAIL FROM:<>\r\nRCPT TO:<bob@example.com>\r\n"
    fresh.answer(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert result_of(second).answer is Answer.VALID


@pytest.mark.parametrize(
    "server_does",
    ["refuses the connection", "never greets", "greets with 554", "closes after EHLO", "stalls at RCPT"],
)
def test_every_failure_is_unverified_and_answers_450_never_5xx(server_does: str) -> None:
    callouts = Callouts(reply_timeout=10)
    callouts.refuse = server_does == "refuses the connection"
    recipients, _ = callout_filter(callouts.clock, callouts.prober, wait=30)
    pending = recipients.check(rcpt("alice@example.com"))
    if server_does == "never greets":
        callouts.clock.advance(10)
    elif server_does == "greets with 554":
        callouts.wire.answer(b"554 5.3.2 not talking to you\r\n")
    elif server_does == "closes after EHLO":
        callouts.wire.answer(b"220 hi\r\n")
        callouts.wire.loseConnection()
    elif server_does == "stalls at RCPT":
        callouts.greet().answer(b"250 2.1.0 Ok\r\n")
        callouts.clock.advance(10)
    verdict = result_of(pending)
    assert verdict.action is Action.DEFER
    assert reply_of(verdict).startswith("450 4.1.1 <alice@example.com>: ")


def test_callouts_per_server_are_bounded_and_the_rest_wait_their_turn() -> None:
    callouts = Callouts(concurrency=2, keep_open=5)
    found = [callouts.prober.probe(f"user{n}@example.com") for n in range(3)]
    assert len(callouts.wires) == 2 and callouts.prober.waiting == 1
    first = callouts.wires[0]
    first.answer(b"220 hi\r\n")
    first.said()
    first.answer(EHLO)
    first.said()
    first.answer(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert result_of(found[0]).answer is Answer.VALID
    # the waiting callout took the session just freed
    assert len(callouts.wires) == 2
    assert first.said() == b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<user2@example.com>\r\n"
    # and past the queue limit, the answer is "unverified" at once
    for n in range(2 * QUEUE_PER_SESSION):
        callouts.prober.probe(f"more{n}@example.com")
    lookup = result_of(callouts.prober.probe("late@example.com"))
    assert lookup.answer is Answer.UNVERIFIED and "too many callouts" in lookup.detail


def test_from_config_connects_to_the_first_host_of_the_route_or_the_server_option() -> None:
    reactor = MemoryReactorClock()
    recipients = build('connect_timeout = "3s"\n', reactor)
    recipients.check(rcpt("alice@example.com"))
    recipients.check(rcpt("alice@example.org"))
    assert [client[:2] for client in reactor.tcpClients] == [("192.0.2.10", 2525), ("192.0.2.20", 24)]
    assert reactor.tcpClients[0][3] == 3  # the connect timeout
    reactor = MemoryReactorClock()
    recipients = build('server = "lmtp:[192.0.2.30]:24"\n', reactor)
    recipients.check(rcpt("alice@example.com"))
    assert [client[:2] for client in reactor.tcpClients] == [("192.0.2.30", 24)]


def test_from_config_end_to_end_over_a_memory_reactor() -> None:
    reactor = MemoryReactorClock()
    recipients = build('keep_open = "2s"\n', reactor)
    pending = recipients.check(rcpt("nobody@example.com"))
    wrapper = reactor.tcpClients[0][2].buildProtocol(None)  # the endpoint's wrapper around ours
    wire = Wire(wrapper._wrappedProtocol)
    wrapper.makeConnection(wire)
    wire.answer(b"220 exchange.example.com ESMTP\r\n")
    assert wire.said() == b"EHLO gw.example.com\r\n"  # our hostname
    wire.answer(EHLO)
    assert wire.said() == b"MAIL FROM:<>\r\nRCPT TO:<nobody@example.com>\r\n"
    wire.answer(b"250 2.1.0 Ok\r\n550 5.1.1 <nobody@example.com>: User unknown\r\n")
    assert reply_of(result_of(pending)) == UNKNOWN
    reactor.advance(2)
    assert wire.said() == b"QUIT\r\n"


# -- the fake and the real prober keep the same contract --------------------------------------------


class MemoryProber:
    """A prober answering from a set of users (for tests of what sits on top of a prober)."""

    def __init__(self, users: set[str], deferred: set[str]) -> None:
        self.users = users
        self.deferred = deferred

    def probe(self, address: str) -> Deferred[Lookup]:
        if address in self.deferred:
            return succeed(Lookup(Answer.UNVERIFIED, "450"))
        return succeed(Lookup(Answer.VALID if address in self.users else Answer.UNKNOWN, ""))


def _scripted_smtp(users: set[str], deferred: set[str]) -> Callable[[str], Deferred[Lookup]]:
    """A real SmtpProber in front of a small SMTP server that knows `users`."""
    callouts = Callouts()

    def probe(address: str) -> Deferred[Lookup]:
        connections = len(callouts.wires)
        found = callouts.prober.probe(address)
        if len(callouts.wires) > connections:
            callouts.greet()
        wire = callouts.wire
        command = wire.said()
        assert command.endswith(f"RCPT TO:<{address}>\r\n".encode())
        if command.startswith(b"RSET"):
            wire.answer(b"250 2.0.0 Ok\r\n")
        wire.answer(b"250 2.1.0 Ok\r\n")
        if address in deferred:
            wire.answer(b"450 4.2.1 mailbox busy\r\n")
        elif address in users:
            wire.answer(b"250 2.1.5 Ok\r\n")
        else:
            wire.answer(b"550 5.1.1 User unknown\r\n")
        return found

    return probe


@pytest.mark.parametrize("kind", ["memory", "smtp"])
def test_prober_contract(kind: str) -> None:
    users, deferred = {"alice@example.com"}, {"busy@example.com"}
    probe = MemoryProber(users, deferred).probe if kind == "memory" else _scripted_smtp(users, deferred)
    assert result_of(probe("alice@example.com")).answer is Answer.VALID
    assert result_of(probe("nobody@example.com")).answer is Answer.UNKNOWN
    assert result_of(probe("busy@example.com")).answer is Answer.UNVERIFIED
    assert result_of(probe("alice@example.com")).answer is Answer.VALID


def test_relative_files_outside_a_config_file_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "users.txt").write_text("alice@example.com\n")
    monkeypatch.chdir(tmp_path)
    recipients = build('mode = "static"\nfiles = ["users.txt"]\n', source="<embedded>")
    assert result_of(recipients.check(rcpt("alice@example.com"))).action is Action.CONTINUE
    assert os.getcwd() == str(tmp_path)


def test_utf8_addresses_are_asked_with_smtputf8_or_left_to_delivery() -> None:
    callouts = Callouts()
    found = callouts.prober.probe("jörg@example.com")
    wire = callouts.greet(b"250-exchange.example.com\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    assert wire.said() == "MAIL FROM:<> SMTPUTF8\r\nRCPT TO:<jörg@example.com>\r\n".encode()
    wire.answer(b"250 2.1.0 Ok\r\n550 5.1.1 unknown\r\n")
    assert result_of(found).answer is Answer.UNKNOWN
    # a server without SMTPUTF8 cannot take the mail at all: not refused here, delivery says why
    callouts = Callouts(keep_open=0)
    found = callouts.prober.probe("jörg@example.com")
    wire = callouts.greet()
    assert wire.said() == b"QUIT\r\n"
    lookup = result_of(found)
    assert lookup.answer is Answer.VALID and "does not offer SMTPUTF8" in lookup.detail


def test_a_domain_whose_route_has_no_server_is_not_verified() -> None:
    clock, prober = Clock(), ScriptedProber()
    recipients, _ = callout_filter(clock, prober)
    # *.example.net is ours, but its mail leaves by "mx": there is nobody to ask
    assert result_of(recipients.check(rcpt("anyone@sub.example.net"))).action is Action.CONTINUE
    assert prober.asked == []
