"""The rhsbl filter: sender (and HELO) domains in DNS domain lists, at MAIL."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters.dns import StaticDnsLookups
from gateway.model import Action, Stage, Verdict
from tests.unit.dns_filters import build, config_error, request, verdict_of

ZONE: dict[str, Any] = {
    "spammer.test.dbl.test": {"A": ["127.0.1.2"], "TXT": ["spam domain spammer.test"]},
    "phish.test.dbl.test": {"A": ["127.0.1.4"]},
    "spammer.test.uribl.test": {"A": ["127.0.0.2"]},
    "bad-helo.test.dbl.test": {"A": ["127.0.1.2"]},
    "trusted.test.dwl.test": {"A": ["127.0.2.2"]},
    "spammer.test.broken.test": DnsTemporaryError("SERVFAIL"),
}


def rhsbl(options: str = 'zones = ["dbl.test"]', dns: Any = None) -> Any:
    return build("rhsbl", options, dns or StaticDnsLookups(ZONE))


def check(filter: Any, sender: str, helo: str = "mail.client.test") -> Verdict:
    return verdict_of(filter.check(request(Stage.MAIL, sender=sender, helo=helo)))


def test_a_listed_sender_domain_is_rejected_naming_domain_zone_and_reason() -> None:
    filter = rhsbl()
    assert filter.stages == frozenset({Stage.MAIL})
    verdict = check(filter, "x@Spammer.Test")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 554, "5.7.1")
    assert verdict.reason == (
        "Service unavailable; sender domain [spammer.test] blocked using dbl.test; spam domain spammer.test"
    )


def test_unlisted_and_null_senders_continue() -> None:
    dns = StaticDnsLookups(ZONE)
    filter = rhsbl(dns=dns)
    assert check(filter, "x@clean.test").action is Action.CONTINUE
    assert check(filter, "").action is Action.CONTINUE
    assert dns.queries == [("clean.test.dbl.test", "A")]


def test_return_codes_weights_and_threshold() -> None:
    filter = rhsbl('zones = ["dbl.test=127.0.1.[2..99]", "uribl.test*2"]\nthreshold = 3')
    assert check(filter, "x@phish.test").action is Action.CONTINUE  # 1 < 3
    verdict = check(filter, "x@spammer.test")
    assert (verdict.action, verdict.score) == (Action.REJECT, 3)
    assert "blocked using uribl.test, dbl.test" in verdict.reason


def test_a_domain_allow_list_accepts_the_stage() -> None:
    filter = rhsbl('zones = ["dbl.test", "dwl.test*-5"]\nwhitelist_threshold = -1')
    assert check(filter, "x@trusted.test").action is Action.ACCEPT


def test_the_helo_name_is_checked_only_when_asked() -> None:
    assert check(rhsbl(), "x@clean.test", helo="bad-helo.test").action is Action.CONTINUE
    filter = rhsbl('zones = ["dbl.test"]\ncheck_helo = true')
    verdict = check(filter, "x@clean.test", helo="bad-helo.test")
    assert verdict.action is Action.REJECT
    assert "HELO name [bad-helo.test] blocked using dbl.test" in verdict.reason
    assert check(filter, "", helo="[192.0.2.1]").action is Action.CONTINUE  # nothing to look up


def test_a_failing_zone_is_not_a_listing() -> None:
    assert check(rhsbl('zones = ["broken.test"]'), "x@spammer.test").action is Action.CONTINUE


def test_tag() -> None:
    verdict = check(rhsbl('zones = ["dbl.test"]\naction = "tag"'), "x@spammer.test")
    assert verdict.action is Action.TAG
    assert verdict.headers == (("X-Mailgate-Rhsbl", "score=1; dbl.test=127.0.1.2*1"),)


@pytest.mark.parametrize(
    ("options", "key"),
    [("txt = true", "zones"), ('zones = ["dbl.test"]\ncheck_sender = false', "check_sender"),
     ('zones = ["dbl.test=127.0.1"]', "zones")],
)  # fmt: skip
def test_bad_options_name_their_key(options: str, key: str) -> None:
    assert f"filters.rhsbl.{key}:" in config_error("rhsbl", options)
