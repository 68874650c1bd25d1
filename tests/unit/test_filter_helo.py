"""The helo filter: syntax, claiming to be us, and resolvability (off by default)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters.dns import StaticDnsLookups
from gateway.filters.helo import _why_not_hostname, address_literal, hostname_problem, listening_addresses
from gateway.model import Action, Stage, Verdict
from tests.unit.dns_filters import build, config_error, request, verdict_of

ZONE: dict[str, Any] = {
    "mail.client.test": {"A": ["192.0.2.7"]},
    "mx-only.client.test": {"MX": [(10, "mail.client.test")]},
    "v6.client.test": {"AAAA": ["2001:db8::7"]},
    "empty.client.test": {"TXT": ["exists, but no address or MX"]},
    "nullmx.client.test": {"MX": [(0, ".")]},
    "slow.client.test": DnsTemporaryError("timed out"),
}
# our listener: 192.0.2.25 (and a wildcard one); our host name: gw.example.com
LISTENERS = """
[gateway]
hostname = "gw.example.com"
[[smtp.listeners]]
endpoint = "tcp:25:interface=192.0.2.25"
[[smtp.listeners]]
endpoint = "tcp6:587:interface=\\\\:\\\\:"
role = "submission"
"""


def helo_filter(options: str = "", dns: Any = None) -> Any:
    return build("helo", options, dns or StaticDnsLookups(ZONE), extra=LISTENERS)


def check(filter: Any, helo: str, client: str = "192.0.2.7") -> Verdict:
    return verdict_of(filter.check(request(Stage.HELO, client, helo=helo)))


# -- syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["mail.client.test", "MAIL.Client.Test.", "exchange01", "a_b.example.com", "xn--bcher-kva.example",
     "[192.0.2.7]", "[IPv6:2001:db8::7]", "[ipv6:2001:db8::9]", "1host.example"],
)  # fmt: skip
def test_valid_names_pass_by_default(name: str) -> None:
    assert check(helo_filter(), name).action is Action.CONTINUE


@pytest.mark.parametrize(
    "name",
    ["192.0.2.7", "[192.0.2.300]", "[2001:db8::7]", "[IPv6:192.0.2.7]", "bad..name", "-dash.example",
     "dash-.example", "sp ace.example", "x" * 64 + ".example", "über.example", "[]", "mail.example.123"],
)  # fmt: skip
def test_invalid_names_are_rejected_as_postfix_does(name: str) -> None:
    verdict = check(helo_filter(), name)
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 501, "5.5.2")
    assert verdict.reason == f"<{name}>: Helo command rejected: Invalid name"


def test_invalid_names_pass_when_the_check_is_off() -> None:
    assert check(helo_filter("reject_invalid = false"), "bad..name").action is Action.CONTINUE


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(st.lists(labels, min_size=1, max_size=5), st.from_regex(r"[a-z][a-z0-9]{1,10}", fullmatch=True))
def test_any_name_of_good_labels_and_a_non_numeric_top_label_is_valid(parts: list[str], top: str) -> None:
    assert hostname_problem(".".join([*parts, top])) is None


@given(st.text(max_size=80))
def test_the_name_check_never_raises_and_rejects_what_is_not_ascii_label_syntax(text: str) -> None:
    problem = hostname_problem(text)
    if problem is None:
        assert all(c.isascii() and (c.isalnum() or c in "-_.") for c in text)


@given(
    st.text(alphabet="aZ09_-.ü\n", max_size=300)
    | st.from_regex(r"([a-z0-9-]{1,70}\.){1,5}[a-z0-9-]{1,70}\.?")
)
def test_the_one_match_agrees_with_the_label_by_label_check(text: str) -> None:
    # hostname_problem answers the usual name with one regular expression and
    # asks the label-by-label check only when that fails: both must agree
    assert (hostname_problem(text) is None) == (_why_not_hostname(text) is None)


def test_address_literals() -> None:
    assert str(address_literal("[192.0.2.1]")) == "192.0.2.1"
    assert str(address_literal("[IPv6:2001:db8::1]")) == "2001:db8::1"
    assert address_literal("[tag:content]") is False
    assert address_literal("mail.example") is None


# -- claiming to be us -------------------------------------------------------------------------


def test_our_host_name_is_rejected() -> None:
    verdict = check(helo_filter(), "GW.example.com.")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert "that is this server's name or address" in verdict.reason


def test_own_names_are_rejected_too_and_the_check_can_be_off() -> None:
    assert check(helo_filter('own_names = ["example.com"]'), "example.com").action is Action.REJECT
    assert check(helo_filter("reject_own_name = false"), "gw.example.com").action is Action.CONTINUE


def test_our_listening_address_and_loopback_literals_from_outside_are_rejected() -> None:
    helo = helo_filter('own_addresses = ["203.0.113.10"]')
    for literal in (
        "[192.0.2.25]",
        "[127.0.0.1]",
        "[IPv6:::1]",
        "[203.0.113.10]",
        "[IPv6:::ffff:192.0.2.25]",
    ):
        assert check(helo, literal, client="198.51.100.9").action is Action.REJECT, literal


def test_an_address_literal_that_is_true_or_local_passes() -> None:
    helo = helo_filter()
    assert check(helo, "[192.0.2.25]", client="192.0.2.25").action is Action.CONTINUE  # itself
    assert check(helo, "[127.0.0.1]", client="127.0.0.2").action is Action.CONTINUE  # this host
    assert check(helo, "[198.51.100.9]", client="198.51.100.9").action is Action.CONTINUE
    assert check(helo, "[192.0.2.99]", client="198.51.100.9").action is Action.CONTINUE  # not ours
    assert (
        check(helo_filter("reject_own_address = false"), "[127.0.0.1]", "198.51.100.9").action
        is Action.CONTINUE
    )


def test_listening_addresses_skip_wildcards_and_unescape() -> None:
    endpoints = [
        "tcp:25:interface=192.0.2.25",
        "tcp6:25:interface=2001\\:db8\\:\\:1",
        "tcp:25",
        "tcp6:1:interface=\\:\\:",
    ]
    assert sorted(map(str, listening_addresses(endpoints))) == ["192.0.2.25", "2001:db8::1"]


# -- FQDN and resolvability --------------------------------------------------------------------


def test_non_fqdn_is_off_by_default_and_504_when_on() -> None:
    assert check(helo_filter(), "exchange01").action is Action.CONTINUE
    verdict = check(helo_filter("reject_non_fqdn = true"), "exchange01")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 504, "5.5.2")


def test_resolvability_is_not_checked_by_default() -> None:
    dns = StaticDnsLookups(ZONE)
    assert check(helo_filter(dns=dns), "unknown.client.test").action is Action.CONTINUE
    assert dns.queries == []


@pytest.mark.parametrize(
    "name", ["mail.client.test", "mx-only.client.test", "v6.client.test", "nullmx.client.test"]
)
def test_a_name_with_an_address_or_mx_is_resolvable(name: str) -> None:
    assert check(helo_filter("reject_unknown = true"), name).action is Action.CONTINUE


@pytest.mark.parametrize("name", ["unknown.client.test", "empty.client.test"])
def test_an_unknown_name_is_450_by_default_and_550_when_asked(name: str) -> None:
    verdict = check(helo_filter("reject_unknown = true"), name)
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 450, "4.7.1")
    assert verdict.reason == f"<{name}>: Helo command rejected: Host not found"
    verdict = check(helo_filter("reject_unknown = true\nunknown_code = 550"), name)
    assert (verdict.action, verdict.code) == (Action.REJECT, 550)


def test_a_dns_failure_is_no_opinion_or_a_4xx_never_a_5xx() -> None:
    strict = "reject_unknown = true\nunknown_code = 550"
    assert check(helo_filter(strict), "slow.client.test").action is Action.CONTINUE
    verdict = check(helo_filter(strict + '\non_dns_failure = "defer"'), "slow.client.test")
    assert (verdict.action, verdict.code) == (Action.DEFER, 450)


def test_address_literals_are_not_looked_up() -> None:
    dns = StaticDnsLookups(ZONE)
    assert check(helo_filter("reject_unknown = true", dns), "[192.0.2.7]").action is Action.CONTINUE
    assert dns.queries == []


@pytest.mark.parametrize(
    ("options", "key"),
    [("unknown_code = 500", "unknown_code"), ('own_addresses = ["gw"]', "own_addresses"),
     ('on_dns_failure = "reject"', "on_dns_failure"), ("reject_invalid = 1", "reject_invalid")],
)  # fmt: skip
def test_bad_options_name_their_key(options: str, key: str) -> None:
    assert f"filters.helo.{key}:" in config_error("helo", options)
