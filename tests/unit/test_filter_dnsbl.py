"""The dnsbl filter: postscreen-style sites, weights, return-code filters, thresholds and actions,
against a fake DNS (StaticDnsLookups, which passes the same contract tests as the real one)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from gateway import config as configuration
from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters import FilterServices, registry
from gateway.filters._dnslists import parse_site
from gateway.filters.dns import StaticDnsLookups
from gateway.filters.dnsbl import reversed_address
from gateway.model import Action, Stage, Verdict
from tests.unit.dns_filters import build, config_error, messages, request, verdict_of

ZONE = {
    # 127.0.0.2: on zen (with a TXT) and on bl2; 127.0.0.4: on zen with two codes
    "2.0.0.127.zen.test": {"A": ["127.0.0.2"], "TXT": ["Listed by zen, see https://zen.test/q?127.0.0.2"]},
    "4.0.0.127.zen.test": {"A": ["127.0.0.4", "127.0.0.10"]},
    "2.0.0.127.bl2.test": {"A": ["127.0.0.2"]},
    # 127.0.0.5: on zen and on the allow list
    "5.0.0.127.zen.test": {"A": ["127.0.0.2"]},
    "5.0.0.127.wl.test": {"A": ["127.0.10.2"]},
    # 127.0.0.7: the list refuses us (Spamhaus's "public resolver" code)
    "7.0.0.127.zen.test": {"A": ["127.255.255.254"]},
    # 127.0.0.8: one zone broken, another lists it
    "8.0.0.127.broken.test": DnsTemporaryError("SERVFAIL"),
    "8.0.0.127.bl2.test": {"A": ["127.0.0.2"]},
    "9.0.0.127.broken.test": DnsTemporaryError("timed out"),
    # an IPv6 client
    f"{reversed_address('2001:db8::5')}.zen.test": {"A": ["127.0.0.2"]},
}


def dnsbl(options: str = 'zones = ["zen.test"]', *, hold: bool = False) -> tuple[Any, StaticDnsLookups]:
    dns = StaticDnsLookups(ZONE, hold=hold)
    return build("dnsbl", options, dns), dns


def connect(filter: Any, client: str) -> Verdict:
    return verdict_of(filter.check(request(Stage.CONNECT, client)))


# -- sites -------------------------------------------------------------------------------------


def test_a_site_with_a_filter_and_a_weight() -> None:
    site = parse_site("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert (site.zone, site.weight) == ("zen.spamhaus.org", 3)
    assert [site.matches(f"127.0.0.{n}") for n in (1, 2, 11, 12)] == [False, True, True, False]


def test_a_site_with_lists_and_ranges_in_several_octets() -> None:
    site = parse_site("list.dnswl.org=127.0.[0..255].[1;3]*-2")
    assert site.weight == -2
    assert site.matches("127.0.15.1") and site.matches("127.0.200.3")
    assert not site.matches("127.0.15.2") and not site.matches("127.1.15.1")


def test_a_bare_zone_counts_any_loopback_answer_but_the_error_codes() -> None:
    site = parse_site("Zen.Test.")
    assert (site.zone, site.weight) == ("zen.test", 1)
    assert site.matches("127.0.0.2") and site.matches("127.0.1.20")
    assert not site.matches("127.255.255.254")  # "you may not query us", not a listing
    assert not site.matches("192.0.2.1")  # a wildcard A of an expired list domain


@pytest.mark.parametrize(
    "bad",
    ["zen", "zen..test", "zen.test=127.0.0", "zen.test=127.0.0.[300]", "zen.test=127.0.0.[5..2]",
     "zen.test*x", "zen.test=127.0.0.[2;;3]", "zen.test=127.0.0.2*", "zen test"],
)  # fmt: skip
def test_malformed_sites_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_site(bad)


octet_ranges = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 255)).map(sorted), min_size=1, max_size=4
)


@given(octet_ranges, st.integers(0, 255), st.integers(-10, 10))
def test_a_filter_matches_exactly_the_union_of_its_ranges(
    ranges: list[list[int]], last: int, weight: int
) -> None:
    items = ";".join(f"{low}..{high}" if low != high else str(low) for low, high in ranges)
    site = parse_site(f"zone.test=127.0.0.[{items}]*{weight}")
    expected = any(low <= last <= high for low, high in ranges)
    assert site.matches(f"127.0.0.{last}") is expected
    assert site.weight == weight


# -- verdicts ----------------------------------------------------------------------------------


def test_a_listed_client_is_rejected_naming_the_zone_and_the_lists_reason() -> None:
    dnsbl_filter, _ = dnsbl()
    verdict = connect(dnsbl_filter, "127.0.0.2")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.REJECT, 554, "5.7.1")
    assert verdict.reason == (
        "Service unavailable; client [127.0.0.2] blocked using zen.test; "
        "Listed by zen, see https://zen.test/q?127.0.0.2"
    )


def test_without_txt_the_reply_has_no_reason_and_no_txt_is_asked() -> None:
    dnsbl_filter, dns = dnsbl('zones = ["zen.test"]\ntxt = false')
    verdict = connect(dnsbl_filter, "127.0.0.2")
    assert verdict.reason == "Service unavailable; client [127.0.0.2] blocked using zen.test"
    assert [rdtype for _, rdtype in dns.queries] == ["A"]


def test_an_unlisted_client_continues() -> None:
    dnsbl_filter, dns = dnsbl()
    assert connect(dnsbl_filter, "127.0.0.3").action is Action.CONTINUE
    assert dns.queries == [("3.0.0.127.zen.test", "A")]


def test_every_zone_is_asked_at_once() -> None:
    dnsbl_filter, dns = dnsbl(
        'zones = ["zen.test*2", "bl2.test", "wl.test*-1", "zen.test=127.0.0.10*5"]', hold=True
    )
    answer = dnsbl_filter.check(request(Stage.CONNECT, "127.0.0.2"))
    # all three zones asked before any answered; zen once although two sites name it
    assert sorted(name for name, _, _ in dns.held) == [
        "2.0.0.127.bl2.test",
        "2.0.0.127.wl.test",
        "2.0.0.127.zen.test",
    ]
    assert not answer.called
    dns.release()  # the A answers; the TXT of the heaviest listing is asked after
    dns.release()
    verdict = verdict_of(answer)
    assert verdict.action is Action.REJECT
    assert verdict.score == 3
    assert "blocked using zen.test, bl2.test" in verdict.reason


def test_weights_add_up_to_the_threshold() -> None:
    options = 'zones = ["zen.test", "bl2.test"]\nthreshold = 2'
    dnsbl_filter, _ = dnsbl(options)
    with capturedLogs() as events:
        assert connect(dnsbl_filter, "127.0.0.4").action is Action.CONTINUE
    assert any(
        "listed by zen.test=127.0.0.4,127.0.0.10*1: score 1 under threshold 2" in m for m in messages(events)
    )
    verdict = connect(dnsbl_filter, "127.0.0.2")
    assert verdict.action is Action.REJECT
    assert verdict.score == 2


def test_an_allow_list_weight_cancels_a_listing() -> None:
    dnsbl_filter, _ = dnsbl('zones = ["zen.test", "wl.test=127.0.[0..255].[1..3]*-2"]')
    assert connect(dnsbl_filter, "127.0.0.5").action is Action.CONTINUE


def test_a_score_under_the_whitelist_threshold_accepts_the_stage() -> None:
    dnsbl_filter, _ = dnsbl(
        'zones = ["zen.test", "wl.test=127.0.[0..255].[1..3]*-2"]\nwhitelist_threshold = -1'
    )
    verdict = connect(dnsbl_filter, "127.0.0.5")
    assert verdict.action is Action.ACCEPT
    assert verdict.reason == "client [127.0.0.5] allowed by wl.test (score -1)"
    assert connect(dnsbl_filter, "127.0.0.3").action is Action.CONTINUE


def test_a_return_code_filter_picks_the_codes_that_count() -> None:
    counted, _ = dnsbl('zones = ["zen.test=127.0.0.[10..11]"]')
    assert connect(counted, "127.0.0.4").action is Action.REJECT
    ignored, _ = dnsbl('zones = ["zen.test=127.0.0.[2..3]"]')
    assert connect(ignored, "127.0.0.4").action is Action.CONTINUE


def test_a_lists_error_code_is_not_a_listing_and_is_logged() -> None:
    dnsbl_filter, _ = dnsbl()
    with capturedLogs() as events:
        assert connect(dnsbl_filter, "127.0.0.7").action is Action.CONTINUE
    assert any("zen.test answered 127.255.255.254" in m and "error code" in m for m in messages(events))


def test_a_failing_zone_counts_as_not_listed_and_never_rejects() -> None:
    dnsbl_filter, _ = dnsbl('zones = ["broken.test", "bl2.test"]')
    with capturedLogs() as events:
        assert connect(dnsbl_filter, "127.0.0.9").action is Action.CONTINUE
        verdict = connect(dnsbl_filter, "127.0.0.8")
    assert verdict.action is Action.REJECT
    assert "blocked using bl2.test" in verdict.reason
    logged = messages(events)
    assert any("9.0.0.127 in broken.test failed (timed out); counted as not listed" in m for m in logged)


def test_tag_adds_the_score_and_a_header() -> None:
    dnsbl_filter, _ = dnsbl('zones = ["zen.test*3", "bl2.test"]\naction = "tag"')
    verdict = connect(dnsbl_filter, "127.0.0.2")
    assert verdict.action is Action.TAG
    assert verdict.score == 4
    assert verdict.headers == (("X-Mailgate-Dnsbl", "score=4; zen.test=127.0.0.2*3, bl2.test=127.0.0.2*1"),)


def test_defer_is_a_4xx() -> None:
    dnsbl_filter, _ = dnsbl('zones = ["zen.test"]\naction = "defer"')
    verdict = connect(dnsbl_filter, "127.0.0.2")
    assert (verdict.action, verdict.code, verdict.enhanced) == (Action.DEFER, 450, "4.7.1")


def test_at_rcpt_stage() -> None:
    dnsbl_filter, _ = dnsbl('zones = ["zen.test"]\nstage = "rcpt"')
    assert dnsbl_filter.stages == frozenset({Stage.RCPT})
    verdict = verdict_of(dnsbl_filter.check(request(Stage.RCPT, "127.0.0.2")))
    assert verdict.action is Action.REJECT


def test_ipv6_and_ipv4_mapped_clients() -> None:
    dnsbl_filter, dns = dnsbl()
    assert connect(dnsbl_filter, "2001:db8::5").action is Action.REJECT
    connect(dnsbl_filter, "::ffff:127.0.0.3")
    assert ("3.0.0.127.zen.test", "A") in dns.queries
    assert (
        reversed_address("2001:db8::5") == "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    )
    assert reversed_address("unix-socket") is None
    assert reversed_address("192.0.2.10") == "10.2.0.192"
    for not_an_address in ("192.0.2.010", "192.0.2", "192.0.2.256", ""):
        assert reversed_address(not_an_address) is None


# -- configuration -----------------------------------------------------------------------------


def test_no_zones_is_a_config_error_naming_the_key() -> None:
    assert "filters.dnsbl.zones: no zones" in config_error("dnsbl", 'action = "tag"')


def test_a_bad_zone_is_a_config_error_with_its_line() -> None:
    message = config_error("dnsbl", 'zones = ["zen.test", "bl.test=127.0.0.[999]"]')
    assert "mailgate.toml, line 5: filters.dnsbl.zones:" in message
    assert "'bl.test=127.0.0.[999]'" in message


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ('zones = ["zen.test"]\nthreshold = 0', "threshold"),
        ('zones = ["zen.test"]\nwhitelist_threshold = 2', "whitelist_threshold"),
        ('zones = ["zen.test"]\naction = "drop"', "action"),
        ('zones = ["zen.test"]\nstage = "data"', "stage"),
        ('zones = ["zen.test"]\nthresold = 2', "thresold"),
    ],
)
def test_bad_options_name_their_key(options: str, key: str) -> None:
    assert f"filters.dnsbl.{key}:" in config_error("dnsbl", options)


def test_the_zones_are_asked_during_the_greet_wait_not_after_it() -> None:
    # postscreen asks its DNSBLs while it waits to see if the client talks first
    clock = Clock()
    dns = StaticDnsLookups(ZONE)
    text = (
        '[filters]\ninbound = ["protocol", "dnsbl"]\n'
        '[filters.protocol]\ngreet_wait = "6s"\n[filters.dnsbl]\nzones = ["zen.test", "bl2.test"]\n'
    )
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    runner = registry.build_runner(cfg, FilterServices(cfg, clock, dns=dns, anvil=object(), store=object()))
    answer = runner.run(request(Stage.CONNECT, "127.0.0.2"))
    assert sorted(dns.queries) == [("2.0.0.127.bl2.test", "A"), ("2.0.0.127.zen.test", "A")]
    assert not answer.called  # the greet wait goes on
    clock.advance(6)
    outcome: list[Any] = []
    answer.addBoth(outcome.append)
    assert outcome[0].decided_by == "dnsbl" and outcome[0].verdict.action is Action.REJECT
