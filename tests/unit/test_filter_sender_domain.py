"""The sender-domain filter: the sender's domain must exist and take mail."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters.dns import StaticDnsLookups
from gateway.filters.sender_domain import domain_of
from gateway.model import Action, Stage, Verdict
from tests.unit.dns_filters import build, config_error, request, verdict_of

ZONE: dict[str, Any] = {
    "mx.test": {"MX": [(10, "mail.mx.test")]},
    "implicit.test": {"A": ["192.0.2.3"]},
    "v6.test": {"AAAA": ["2001:db8::3"]},
    "nullmx.test": {"MX": [(0, ".")], "A": ["192.0.2.4"]},
    "bare.test": {"TXT": ["a name with no mail records"]},
    "slow.test": DnsTemporaryError("timed out"),
}


def sender_domain(options: str = "", dns: Any = None) -> Any:
    return build("sender-domain", options, dns or StaticDnsLookups(ZONE))


def check(filter: Any, sender: str) -> Verdict:
    return verdict_of(filter.check(request(Stage.MAIL, sender=sender)))


@pytest.mark.parametrize(
    "sender", ["a@mx.test", "a@Implicit.Test.", "a@v6.test", "", "a@[192.0.2.1]", "postmaster"]
)
def test_senders_whose_domain_takes_mail_pass_and_so_does_the_null_sender(sender: str) -> None:
    assert check(sender_domain(), sender).action is Action.CONTINUE


@pytest.mark.parametrize("sender", ["a@nowhere.test", "a@bare.test"])
def test_a_domain_that_does_not_exist_or_has_no_mail_records_is_550_5_1_8(sender: str) -> None:
    verdict = check(sender_domain(), sender)
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 550, "5.1.8")
    assert verdict.reason == f"<{sender}>: Sender address rejected: Domain not found"


def test_reject_code_450_makes_it_temporary() -> None:
    verdict = check(sender_domain("reject_code = 450"), "a@nowhere.test")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 450, "4.1.8")


def test_a_null_mx_domain_accepts_no_mail() -> None:
    verdict = check(sender_domain(), "a@nullmx.test")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 550, "5.7.27")
    assert "accepts no mail (null MX)" in verdict.reason


def test_a_dns_failure_is_450_4_1_8_or_no_opinion_never_a_5xx() -> None:
    verdict = check(sender_domain(), "a@slow.test")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 450, "4.1.8")
    assert check(sender_domain('on_dns_failure = "continue"'), "a@slow.test").action is Action.CONTINUE


def test_the_null_sender_asks_nothing() -> None:
    dns = StaticDnsLookups(ZONE)
    check(sender_domain(dns=dns), "")
    assert dns.queries == []


def test_domain_of() -> None:
    assert domain_of("User@Example.COM.") == "example.com"
    assert domain_of('"odd@local"@example.com') == "example.com"
    assert [domain_of(a) for a in ("", "postmaster", "@example.com", "a@[192.0.2.1]", "a@")] == [None] * 5


def test_bad_options_name_their_key() -> None:
    assert "filters.sender-domain.reject_code:" in config_error("sender-domain", "reject_code = 554")
    assert "filters.sender-domain.on_dns_failure:" in config_error("sender-domain", 'on_dns_failure = "x"')
