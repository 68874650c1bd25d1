"""The reverse-dns filter: forward-confirmed reverse DNS of the client at CONNECT."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from gateway import config as configuration
from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters import FilterServices, registry
from gateway.filters.dns import StaticDnsLookups
from gateway.model import Action, Stage, Verdict
from tests.unit.dns_filters import build, config_error, request, verdict_of

ZONE: dict[str, Any] = {
    # confirmed: PTR -> name -> the same address (the second name confirms)
    "192.0.2.1": {"PTR": ["stale.example.test", "mail.example.test"]},
    "stale.example.test": {"A": ["192.0.2.99"]},
    "mail.example.test": {"A": ["192.0.2.1"]},
    "2001:db8::1": {"PTR": ["v6.example.test"]},
    "v6.example.test": {"AAAA": ["2001:db8:0:0::1"]},
    # a PTR whose name points elsewhere, or nowhere
    "192.0.2.2": {"PTR": ["liar.example.test"]},
    "liar.example.test": {"A": ["198.51.100.1"]},
    "192.0.2.3": {"PTR": ["gone.example.test"]},
    # a reverse zone that exists without a PTR for this address (NODATA)
    "192.0.2.4": {"TXT": ["no ptr here"]},
    # DNS trouble on the way
    "192.0.2.5": DnsTemporaryError("SERVFAIL"),
    "192.0.2.6": {"PTR": ["slow.example.test"]},
    "slow.example.test": DnsTemporaryError("timed out"),
}


def reverse_dns(options: str = "", dns: Any = None) -> Any:
    return build("reverse-dns", options, dns or StaticDnsLookups(ZONE))


def check(filter: Any, client: str) -> Verdict:
    return verdict_of(filter.check(request(Stage.CONNECT, client)))


@pytest.mark.parametrize("client", ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"])
def test_a_confirmed_client_continues(client: str) -> None:
    assert check(reverse_dns('no_ptr = "reject"\nnot_confirmed = "reject"'), client).action is Action.CONTINUE


def test_by_default_no_ptr_and_not_confirmed_are_tagged_not_refused() -> None:
    filter = reverse_dns()
    verdict = check(filter, "192.0.2.99")
    assert (verdict.action, verdict.score) == (Action.TAG, 1.0)
    assert verdict.headers == (("X-Mailgate-Reverse-Dns", "none"),)
    assert verdict.reason == "client [192.0.2.99] has no reverse DNS (PTR)"
    verdict = check(filter, "192.0.2.2")
    assert (verdict.action, verdict.score) == (Action.TAG, 0.5)
    assert verdict.headers == (("X-Mailgate-Reverse-Dns", "not-confirmed ptr=liar.example.test"),)


@pytest.mark.parametrize("client", ["192.0.2.99", "192.0.2.4"])
def test_no_ptr_rejected_as_postfix_with_450(client: str) -> None:
    verdict = check(reverse_dns('no_ptr = "reject"'), client)
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 450, "4.7.1")
    assert verdict.reason == f"Client host rejected: cannot find your reverse hostname, [{client}]"


@pytest.mark.parametrize("client", ["192.0.2.2", "192.0.2.3"])
def test_not_confirmed_rejected_with_550_when_asked(client: str) -> None:
    verdict = check(reverse_dns('not_confirmed = "reject"\nreject_code = 550'), client)
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert verdict.reason == f"Client host rejected: cannot find your hostname, [{client}]"


def test_continue_turns_an_outcome_off() -> None:
    filter = reverse_dns('no_ptr = "continue"\nnot_confirmed = "continue"')
    assert check(filter, "192.0.2.99").action is Action.CONTINUE
    assert check(filter, "192.0.2.2").action is Action.CONTINUE


@pytest.mark.parametrize("client", ["192.0.2.5", "192.0.2.6"])
def test_dns_trouble_is_no_opinion_or_a_4xx_never_a_5xx(client: str) -> None:
    strict = 'no_ptr = "reject"\nnot_confirmed = "reject"\nreject_code = 550'
    assert check(reverse_dns(strict), client).action is Action.CONTINUE
    verdict = check(reverse_dns(strict + '\non_dns_failure = "defer"'), client)
    assert (verdict.action, verdict.code) == (Action.DEFER, 450)


def test_at_most_five_names_are_followed() -> None:
    names = [f"n{number}.example.test" for number in range(20)]
    dns = StaticDnsLookups({"192.0.2.8": {"PTR": names}})
    check(reverse_dns(dns=dns), "192.0.2.8")
    followed = {name for name, rdtype in dns.queries if rdtype == "A"}
    assert followed == set(names[:5])


def test_a_non_ip_peer_is_left_alone() -> None:
    assert check(reverse_dns('no_ptr = "reject"'), "unix").action is Action.CONTINUE


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ('no_ptr = "drop"', "no_ptr"),
        ("reject_code = 554", "reject_code"),
        ('no_ptr_score = "x"', "no_ptr_score"),
    ],
)
def test_bad_options_name_their_key(options: str, key: str) -> None:
    assert f"filters.reverse-dns.{key}:" in config_error("reverse-dns", options)


def test_the_ptr_and_its_names_are_looked_up_while_an_earlier_filter_waits() -> None:
    clock = Clock()
    dns = StaticDnsLookups(ZONE)
    text = '[filters]\ninbound = ["protocol", "reverse-dns"]\n[filters.protocol]\ngreet_wait = "6s"\n'
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    runner = registry.build_runner(cfg, FilterServices(cfg, clock, dns=dns, anvil=object(), store=object()))
    answer = runner.run(request(Stage.CONNECT, "192.0.2.2"))
    assert not answer.called  # the greet wait goes on, and the lookups are done already
    assert [name for name, _ in dns.queries][:2] == ["2.2.0.192.in-addr.arpa", "liar.example.test"]
    asked = len(dns.queries)
    clock.advance(6)
    outcome: list[Any] = []
    answer.addBoth(outcome.append)
    assert outcome[0].hits[0].filter == "reverse-dns"  # not confirmed: tagged, as without the early start
    assert len(dns.queries) == 2 * asked  # this fake has no cache: check() asked the same again


def test_an_early_lookup_that_fails_is_judged_by_the_check_not_logged() -> None:
    reverse = reverse_dns(dns=StaticDnsLookups(ZONE))
    with capturedLogs() as events:
        reverse.prepare(request(Stage.CONNECT, "192.0.2.5"))  # SERVFAIL
        reverse.prepare(request(Stage.CONNECT, "192.0.2.6"))  # the name's lookup times out
        reverse.prepare(request(Stage.CONNECT, "192.0.2.3"))  # the name does not exist
        gc.collect()  # a failure nobody handled would be logged now
    assert events == []
    assert check(reverse, "192.0.2.5").action is Action.CONTINUE  # DNS trouble: no opinion
