"""Send quotas: a sender past its quota has its mail held (or deferred), with one alert a period."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from gateway.config import ConfigError
from gateway.filters.quota import period_text
from gateway.interfaces import IAcceptObserver, IFilter
from gateway.model import Session, Stage
from gateway.smtp.reply import Reply
from gateway.state import StoreError
from tests.unit.reception_driver import Driver

INSIDE = Session("10.1.2.3", may_relay=True)  # relay.networks: the outbound chain
HOUR = 3600.0
OUT = ("someone@elsewhere.test",)


def driver(options: str = "", **kwargs: Any) -> Driver:
    return Driver(f'[filters]\noutbound = ["quota"]\n[filters.quota]\n{options}', **kwargs)


@pytest.fixture
def alerts() -> Iterator[list[str]]:
    """The warnings the quota filter logs."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mailgate.filter.quota" and event["log_level"] is LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def send(
    gateway: Driver,
    sender: str = "alice@corp.test",
    recipients: tuple[str, ...] = OUT,
    session: Session = INSIDE,
) -> tuple[Reply | None, list[Reply | None], Reply | None]:
    return gateway.send(session, sender, recipients)


def test_provides_filter_and_accept_observer() -> None:
    quota = driver().filter("quota")
    assert verifyObject(IFilter, quota)
    assert verifyObject(IAcceptObserver, quota)
    assert quota.stages == frozenset({Stage.MAIL, Stage.RCPT})


def test_past_the_message_quota_mail_is_held_and_one_alert_is_logged(alerts: list[str]) -> None:
    gateway = driver("messages = 3")
    for _ in range(3):
        mail, [rcpt], end = send(gateway)
        assert (mail, rcpt) == (None, None) and end is not None and end.code == 250
    assert gateway.states() == ["incoming"] * 3
    assert alerts == []
    # the fourth and fifth: accepted (the client sees 250), but held for the operator
    for _ in range(2):
        mail, [rcpt], end = send(gateway)
        assert (mail, rcpt) == (None, None) and end is not None and end.code == 250
    assert gateway.states() == ["incoming"] * 3 + ["hold"] * 2
    assert alerts == [
        "ALERT: send quota exceeded by sender=<alice@corp.test> (4 messages in 1h, limit 3): "
        "holding its mail (a compromised account?)"
    ]
    # other senders are not concerned
    send(gateway, "bob@corp.test")
    assert gateway.states()[-1] == "incoming"


def test_the_quota_and_the_alert_start_again_after_the_period(alerts: list[str]) -> None:
    gateway = driver('messages = 1\nperiod = "1h"')
    send(gateway)
    send(gateway)
    gateway.clock.advance(HOUR)
    send(gateway)
    assert gateway.states() == ["incoming", "hold", "incoming"]
    send(gateway)
    assert gateway.states()[-1] == "hold"
    assert len(alerts) == 2


def test_past_the_recipient_quota_mail_is_held(alerts: list[str]) -> None:
    gateway = driver("recipients = 5")
    send(gateway, recipients=("a@x.test", "b@x.test", "c@x.test"))
    # 3 sent + 2 in this envelope: still within; the third of this envelope is one too many
    _mail, rcpts, end = send(gateway, recipients=("d@x.test", "e@x.test", "f@x.test"))
    assert rcpts == [None, None, None] and end is not None and end.code == 250
    assert gateway.states() == ["incoming", "hold"]
    assert alerts == [
        "ALERT: send quota exceeded by sender=<alice@corp.test> (6 recipients in 1h, limit 5): "
        "holding its mail (a compromised account?)"
    ]


def test_defer_instead_of_hold(alerts: list[str]) -> None:
    gateway = driver('messages = 1\nrecipients = 2\naction = "defer"')
    send(gateway)
    mail, _, _ = send(gateway)
    assert mail == Reply(450, "4.7.1", "Send quota of 1 messages per 1h reached, try again later")
    other = driver('recipients = 2\naction = "defer"')
    mail, rcpts, end = send(other, recipients=("a@x.test", "b@x.test", "c@x.test"))
    assert rcpts == [None, None, Reply(452, "4.5.3", "Too many recipients: send quota of 2 per 1h reached")]
    assert end is not None and end.code == 250  # the first two go
    assert gateway.states() == ["incoming"]
    assert alerts[0].endswith("(2 messages in 1h, limit 1): deferring its mail (a compromised account?)")


def test_the_count_is_shared_by_the_smtp_processes() -> None:
    first = driver("messages = 2")
    second = driver("messages = 2", store=first.store)  # another worker, the same store
    send(first)
    send(second)
    send(first)
    assert first.states() == ["incoming", "hold"]
    assert second.states() == ["incoming"]


def test_keyed_by_authenticated_user() -> None:
    gateway = driver('messages = 1\nkey = "user"')
    alice = Session("203.0.113.5", may_relay=True, authenticated_user="alice")
    send(gateway, "alice@corp.test", session=alice)
    send(gateway, "other-address@corp.test", session=alice)  # the same user, another address
    assert gateway.states() == ["incoming", "hold"]
    # a relay client without AUTH is counted by its IP address
    send(gateway, "x@corp.test", session=Session("10.9.9.9", may_relay=True))
    send(gateway, "y@corp.test", session=Session("10.9.9.9", may_relay=True))
    assert gateway.states()[2:] == ["incoming", "hold"]


def test_keyed_by_client_ip() -> None:
    gateway = driver('messages = 1\nkey = "client"')
    send(gateway, "a@corp.test")
    send(gateway, "b@corp.test")
    send(gateway, "a@corp.test", session=Session("10.1.2.4", may_relay=True))
    assert gateway.states() == ["incoming", "hold", "incoming"]


def test_the_null_sender_is_counted_by_client_ip(alerts: list[str]) -> None:
    gateway = driver("messages = 1")
    send(gateway, "")
    send(gateway, "")
    assert gateway.states() == ["incoming", "hold"]
    assert "by client=[10.1.2.3] (2 messages in 1h" in alerts[0]


def test_exempt_senders_have_no_quota() -> None:
    gateway = driver('messages = 1\nexempt = ["Newsletter@corp.test", "10.1.2.3"]')
    for _ in range(3):
        send(gateway, "newsletter@corp.test")
    assert gateway.states() == ["incoming"] * 3
    client = driver('messages = 1\nkey = "client"\nexempt = ["10.1.2.3"]')
    for _ in range(3):
        send(client)
    assert client.states() == ["incoming"] * 3


def test_zero_means_no_limit() -> None:
    gateway = driver("messages = 0\nrecipients = 0")
    for _ in range(5):
        send(gateway, recipients=("a@x.test", "b@x.test"))
    assert gateway.states() == ["incoming"] * 5
    assert gateway.store.counters == {}


def test_mail_of_another_chain_is_not_counted() -> None:
    gateway = driver("messages = 1")
    outsider = Session("198.51.100.7")  # inbound: quota is only in the outbound chain
    for _ in range(3):
        send(gateway, "alice@corp.test", ("bob@example.com",), session=outsider)
    send(gateway)
    assert gateway.states() == ["incoming"] * 4


def test_a_broken_store_defers_at_mail() -> None:
    gateway = driver()
    gateway.store.failure = StoreError("database is locked")
    mail, _, _ = send(gateway)
    assert mail is not None and (mail.code, mail.enhanced) == (451, "4.3.0")


def test_period_text() -> None:
    assert [period_text(s) for s in (3600, 86400, 1800, 90, 7200, 5400)] == [
        "1h",
        "1d",
        "30m",
        "90s",
        "2h",
        "90m",
    ]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ("messages = -1", "filters.quota.messages: must be 0"),
        ("recipients = -1", "filters.quota.recipients: must be 0"),
        ("period = 0", "filters.quota.period: must be longer than 0 s"),
        ('key = "domain"', "filters.quota.key: must be one of sender, user, client"),
        ('action = "reject"', "filters.quota.action: must be one of hold, defer"),
        ("exempt = [1]", "filters.quota.exempt: must be a list of strings"),
    ],
)
def test_bad_options_name_the_key(options: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        driver(options)
