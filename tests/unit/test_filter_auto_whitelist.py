"""The automatic whitelist: senders with clean mail skip the content filters; nobody else does."""

from __future__ import annotations

from typing import Any

import pytest
from zope.interface.verify import verifyObject

from gateway.config import ConfigError
from gateway.filters import FilterServices, Request
from gateway.filters.chain import Hit
from gateway.filters.registry import build_runner
from gateway.filters.testing import StaticFilter
from gateway.interfaces import IAcceptObserver, IFilter
from gateway.model import Action, Direction, Envelope, Session, Stage, Verdict
from gateway.state import StoreError
from tests.unit.reception_driver import Driver, config, fired

CLIENT = Session("192.0.2.10")
NEIGHBOUR = Session("192.0.2.77")  # the same /24
STRANGER = Session("198.51.100.10")
SENDER = "alice@partner.test"
DAY = 86400.0


def driver(options: str = "", *, scanner: Any = None) -> Driver:
    """auto-whitelist in the inbound chain, followed by a content scanner that tags everything."""
    scanner = scanner or StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    return Driver(
        f'[filters]\ninbound = ["auto-whitelist"]\n[filters.auto-whitelist]\n{options}',
        appended={Direction.INBOUND: (scanner,)},
    )


def scanned(scanner: StaticFilter) -> int:
    return sum(1 for request in scanner.requests if request.stage is Stage.DATA)


def test_provides_filter_and_accept_observer() -> None:
    awl = driver().filter("auto-whitelist")
    assert verifyObject(IFilter, awl)
    assert verifyObject(IAcceptObserver, awl)
    assert awl.stages == frozenset({Stage.DATA})


def test_after_three_clean_messages_the_sender_skips_the_content_filters() -> None:
    scanner = StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    gateway = driver(scanner=scanner)
    for number in range(1, 4):
        *_, end = gateway.send(CLIENT, SENDER)
        assert end is not None and end.code == 250
        assert scanned(scanner) == number  # still scanned: not whitelisted yet
    *_, end = gateway.send(CLIENT, SENDER)
    assert end is not None and end.code == 250
    assert scanned(scanner) == 3  # whitelisted: the scanner after it was skipped
    assert gateway.states() == ["incoming"] * 4


def test_a_whitelisted_sender_is_skipped_only_from_its_own_network() -> None:
    scanner = StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    gateway = driver(scanner=scanner)
    for _ in range(3):
        gateway.send(CLIENT, SENDER)
    gateway.send(NEIGHBOUR, SENDER)  # the same /24: whitelisted
    assert scanned(scanner) == 3
    gateway.send(STRANGER, SENDER)  # a forged sender from elsewhere is scanned
    gateway.send(CLIENT, "mallory@partner.test")  # and so is another sender from the same network
    assert scanned(scanner) == 5


def test_ipv6_clients_are_grouped_by_slash_64() -> None:
    scanner = StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    gateway = driver(scanner=scanner)
    for host in ("2001:db8:1:2::10", "2001:db8:1:2::11", "2001:db8:1:2:ffff::1"):
        gateway.send(Session(host), SENDER)
    gateway.send(Session("2001:db8:1:2::99"), SENDER)
    assert scanned(scanner) == 3
    gateway.send(Session("2001:db8:1:3::10"), SENDER)
    assert scanned(scanner) == 4


def test_the_null_sender_is_never_whitelisted() -> None:
    scanner = StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    gateway = driver(scanner=scanner)
    for _ in range(6):
        gateway.send(CLIENT, "")
    assert scanned(scanner) == 6
    assert gateway.store.counters == {}


def test_a_held_or_tagged_message_starts_the_count_again() -> None:
    verdicts: list[Verdict] = []
    scanner = StaticFilter("scanner", {Stage.DATA: lambda request: verdicts.pop(0)})
    gateway = driver(scanner=scanner)
    clean = Verdict(Action.CONTINUE)
    held = Verdict(Action.QUARANTINE, "looks like a virus")
    tagged = Verdict(Action.TAG, "spam", score=5.0, headers=(("X-Spam", "yes"),))
    for verdict in (clean, clean, held, clean, clean, tagged, clean, clean, clean):
        verdicts.append(verdict)
        gateway.send(CLIENT, SENDER)
    assert gateway.states()[2] == "hold"
    # only the last three in a row count: the next one is whitelisted
    gateway.send(CLIENT, SENDER)
    assert scanned(scanner) == 9


def test_a_positive_score_or_a_rejected_recipient_is_not_clean() -> None:
    awl = driver().filter("auto-whitelist")
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ()))

    def hit(action: Action, score: float = 0.0, failed: bool = False) -> Hit:
        return Hit("other", Stage.RCPT, action, "", score, 0.001, None, failed)

    def whitelisted_after(*hits: Hit) -> bool:
        for _ in range(3):
            awl.message_accepted(request, hits, False)
        verdict = fired(awl.check(request))
        fired(awl.store.delete("auto-whitelist", awl.key(CLIENT, SENDER)))
        return verdict.action is Action.ACCEPT

    assert whitelisted_after()
    assert whitelisted_after(hit(Action.DEFER))  # greylisted for a moment: says nothing
    assert whitelisted_after(hit(Action.CONTINUE, score=-1.0))  # a DNSWL's negative score
    assert not whitelisted_after(hit(Action.CONTINUE, score=0.5))
    assert not whitelisted_after(hit(Action.REJECT))  # one recipient was refused
    assert not whitelisted_after(hit(Action.DISCARD))
    assert not whitelisted_after(hit(Action.DEFER, failed=True))  # not really checked: not counted


def test_a_dirty_message_ends_a_whitelisting() -> None:
    awl = driver().filter("auto-whitelist")
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ()))
    for _ in range(3):
        awl.message_accepted(request, (), False)
    assert fired(awl.check(request)).action is Action.ACCEPT
    tag = Hit("helo", Stage.HELO, Action.TAG, "odd HELO", 1.0, 0.0)
    awl.message_accepted(request, (tag,), False)
    assert fired(awl.check(request)).action is Action.CONTINUE


def test_a_message_refused_at_data_ends_a_whitelisting() -> None:
    awl = driver().filter("auto-whitelist")
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ()))
    for _ in range(3):
        awl.message_accepted(request, (), False)
    rejected = Hit("clamav", Stage.DATA, Action.REJECT, "virus", 0.0, 0.0)
    awl.message_refused(request, (rejected,))
    assert fired(awl.check(request)).action is Action.CONTINUE


def test_a_message_deferred_at_data_is_not_counted_as_clean() -> None:
    awl = driver().filter("auto-whitelist")
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ()))
    deferred = Hit("spamd", Stage.DATA, Action.DEFER, "try later", 0.0, 0.0)
    for _ in range(3):
        awl.message_refused(request, (deferred,))
    assert fired(awl.check(request)).action is Action.CONTINUE


def test_the_whitelisting_expires_unless_clean_mail_renews_it() -> None:
    gateway = driver('max_age = "30d"')
    awl = gateway.filter("auto-whitelist")
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ()))
    for _ in range(3):
        gateway.send(CLIENT, SENDER)
    gateway.clock.advance(20 * DAY)
    assert fired(awl.check(request)).action is Action.ACCEPT
    gateway.send(CLIENT, SENDER)  # whitelisted and clean: renewed for 30 days from now
    gateway.clock.advance(25 * DAY)
    assert fired(awl.check(request)).action is Action.ACCEPT
    gateway.clock.advance(5 * DAY)
    assert fired(awl.check(request)).action is Action.CONTINUE


def test_a_whitelisted_sender_stays_whitelisted_while_it_sends_clean_mail() -> None:
    gateway = driver('max_age = "30d"')
    awl = gateway.filter("auto-whitelist")
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ()))
    for _ in range(3):
        gateway.send(CLIENT, SENDER)
    # one clean message every 20 days: its clean count starts again each 30 days, but
    # a whitelisted sender's clean message renews the whitelisting all the same
    for _ in range(6):
        gateway.clock.advance(20 * DAY)
        assert fired(awl.check(request)).action is Action.ACCEPT
        gateway.send(CLIENT, SENDER)


def test_clean_messages_is_configurable() -> None:
    scanner = StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    gateway = driver("clean_messages = 1", scanner=scanner)
    gateway.send(CLIENT, SENDER)
    gateway.send(CLIENT, SENDER)
    assert scanned(scanner) == 1


def test_mail_of_another_chain_is_not_counted() -> None:
    gateway = driver()
    awl = gateway.filter("auto-whitelist")
    inside = Session("10.1.2.3", may_relay=True)  # outbound: auto-whitelist is not in that chain
    for _ in range(3):
        gateway.send(inside, SENDER, ("someone@elsewhere.test",))
    request = Request(Stage.DATA, Direction.INBOUND, inside, Envelope(SENDER, ()))
    assert fired(awl.check(request)).action is Action.CONTINUE


def test_a_broken_store_defers_the_message_and_is_survived_after_it() -> None:
    scanner = StaticFilter("scanner", {Stage.DATA: Verdict(Action.CONTINUE)})
    gateway = driver(scanner=scanner)
    gateway.store.failure = StoreError("database is locked")
    *_, end = gateway.send(CLIENT, SENDER)
    assert end is not None and (end.code, end.enhanced) == (451, "4.3.0")  # the runner's failure verdict
    assert gateway.spool.messages == {}
    awl = gateway.filter("auto-whitelist")
    # an observer whose store fails only logs: the message was already queued
    awl.message_accepted(Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope(SENDER, ())), (), False)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("clean_messages = 0", "filters.auto-whitelist.clean_messages: must be at least 1"),
        ('max_age = "0s"', "filters.auto-whitelist.max_age: must be longer than 0 s"),
        ("ipv4_prefix = 33", "filters.auto-whitelist.ipv4_prefix: must be from 8 to 32"),
        ("ipv6_prefix = 8", "filters.auto-whitelist.ipv6_prefix: must be from 16 to 128"),
        ("clean = 3", "filters.auto-whitelist.clean: unknown key"),
    ],
)
def test_bad_options_name_the_key(options: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        driver(options)


@pytest.mark.parametrize("name", ["auto-whitelist", "greylist", "quota"])
def test_building_a_chain_opens_no_store(name: str) -> None:
    # the gateway builds its filters before it forks into a daemon and drops
    # privileges: the store (a thread and a file) must wait for the first check
    class NoStoreYet(FilterServices):
        @property
        def store(self) -> Any:
            raise AssertionError("the store was opened while the chain was built")

    cfg = config(f'[filters]\ninbound = ["{name}"]\n')
    runner = build_runner(cfg, NoStoreYet(cfg, reactor=None))
    assert [link.name for link in runner.chains[Direction.INBOUND]] == [name]
