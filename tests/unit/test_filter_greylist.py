"""Greylisting: the first attempt of a new (network, sender, recipient) is deferred; a retry passes."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from gateway.config import ConfigError
from gateway.interfaces import IFilter
from gateway.model import Session, Stage
from gateway.smtp.reply import Reply
from gateway.state import StoreError
from tests.unit.reception_driver import Driver

CLIENT = Session("192.0.2.10")
SENDER = "alice@partner.test"
DAY = 86400.0


def driver(options: str = "") -> Driver:
    return Driver(f'[filters]\ninbound = ["greylist"]\n[filters.greylist]\n{options}')


def rcpt(
    gateway: Driver, session: Session = CLIENT, sender: str = SENDER, to: str = "bob@example.com"
) -> Reply | None:
    """The reply to one RCPT (None: accepted, and the message was queued)."""
    _mail, [reply], end = gateway.send(session, sender, (to,))
    assert (end is None) == (reply is not None)
    return reply


def greylisted(seconds: int) -> Reply:
    return Reply(450, "4.7.1", f"Greylisted, please try again in {seconds} seconds")


def test_provides_filter_at_rcpt() -> None:
    greylist = driver().filter("greylist")
    assert verifyObject(IFilter, greylist)
    assert greylist.stages == frozenset({Stage.RCPT})


def test_first_attempt_is_deferred_and_a_retry_after_the_delay_passes() -> None:
    gateway = driver()
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(100)
    assert rcpt(gateway) == greylisted(200)  # too early: the time left
    gateway.clock.advance(200)
    assert rcpt(gateway) is None
    assert len(gateway.spool.messages) == 1
    gateway.clock.advance(DAY)
    assert rcpt(gateway) is None  # remembered


def test_each_triplet_is_greylisted_on_its_own() -> None:
    gateway = driver("auto_whitelist_clients = 0")
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway) is None
    assert rcpt(gateway, to="carol@example.com") == greylisted(300)
    assert rcpt(gateway, sender="mallory@partner.test") == greylisted(300)
    assert rcpt(gateway, session=Session("198.51.100.10")) == greylisted(300)
    assert rcpt(gateway, session=Session("192.0.2.200")) is None  # the same /24


def test_several_recipients_are_greylisted_one_by_one() -> None:
    gateway = driver()
    _mail, replies, end = gateway.send(CLIENT, SENDER, ("bob@example.com", "carol@example.com"))
    assert replies == [greylisted(300), greylisted(300)]
    assert end is None
    gateway.clock.advance(300)
    _mail, replies, end = gateway.send(
        CLIENT, SENDER, ("bob@example.com", "carol@example.com", "dan@example.com")
    )
    assert replies == [None, None, None]  # dan: the client network has passed by now
    assert end is not None and end.code == 250


def test_a_retry_keeps_being_recognised_when_bounce_and_batv_addresses_change() -> None:
    gateway = driver("auto_whitelist_clients = 0")
    assert rcpt(gateway, sender="prvs=1234abcd=Alice@Partner.test") == greylisted(300)
    assert rcpt(gateway, sender="bounce-4711-bob=example.com@lists.test") == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway, sender="prvs=9876fedc=alice@partner.test") is None
    assert rcpt(gateway, sender="bounce-4712-bob=example.com@lists.test") is None


def test_a_retry_after_the_retry_window_starts_again() -> None:
    gateway = driver('retry_window = "2d"')
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(2 * DAY)
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway) is None


def test_the_client_network_is_trusted_once_it_has_retried() -> None:
    gateway = driver()  # auto_whitelist_clients = 1
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway) is None
    # a new sender and recipient from that network are not delayed
    assert rcpt(gateway, sender="zoe@partner.test", to="yves@example.com") is None
    assert rcpt(gateway, session=Session("192.0.2.99"), to="xena@example.com") is None
    # for max_age (35 days), renewed while it sends
    gateway.clock.advance(30 * DAY)
    assert rcpt(gateway, to="walt@example.com") is None
    gateway.clock.advance(34 * DAY)
    assert rcpt(gateway, to="vera@example.com") is None
    gateway.clock.advance(36 * DAY)
    assert rcpt(gateway, to="ursula@example.com") == greylisted(300)


def test_auto_whitelist_clients_counts_passed_triplets() -> None:
    gateway = driver("auto_whitelist_clients = 2")
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway) is None  # one passed
    assert rcpt(gateway, to="carol@example.com") == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway, to="carol@example.com") is None  # two passed: trusted from now on
    assert rcpt(gateway, to="dan@example.com") is None


def test_a_passed_triplet_is_forgotten_after_max_age_unused() -> None:
    gateway = driver('auto_whitelist_clients = 0\nmax_age = "35d"')
    assert rcpt(gateway) == greylisted(300)
    gateway.clock.advance(300)
    assert rcpt(gateway) is None
    gateway.clock.advance(30 * DAY)
    assert rcpt(gateway) is None  # used: renewed
    gateway.clock.advance(34 * DAY)
    assert rcpt(gateway) is None
    gateway.clock.advance(35 * DAY)
    assert rcpt(gateway) == greylisted(300)


def test_a_broken_store_defers_never_passes_and_never_refuses() -> None:
    gateway = driver()
    gateway.store.failure = StoreError("database is locked")
    reply = rcpt(gateway)
    assert reply is not None and (reply.code, reply.enhanced) == (451, "4.3.0")
    assert gateway.spool.messages == {}


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ('delay = "1h"\nretry_window = "30m"', "filters.greylist.retry_window: must be longer than delay"),
        ("max_age = 0", "filters.greylist.max_age: must be longer than 0 s"),
        ("auto_whitelist_clients = -1", "filters.greylist.auto_whitelist_clients: must be 0"),
        ('delay = "soon"', "filters.greylist.delay: must be a duration"),
    ],
)
def test_bad_options_name_the_key(options: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        driver(options)
