"""The route table and transport specs."""

from __future__ import annotations

import pytest

from gateway.config import RouteConfig
from gateway.delivery.router import HostPort, Router, TransportSpecError, parse_transport


def test_failover_list_keeps_order() -> None:
    spec = parse_transport("smtp:[192.168.0.10]:25, smtp:[192.168.0.11]:2525")
    assert spec.kind == "smtp"
    assert spec.hosts == (HostPort("192.168.0.10", 25), HostPort("192.168.0.11", 2525))
    assert spec.text == "smtp:[192.168.0.10]:25, smtp:[192.168.0.11]:2525"


def test_host_without_brackets_means_mx_lookup_and_default_port() -> None:
    assert parse_transport("smtp:mail.example.com").hosts == (HostPort("mail.example.com", 25, True),)
    assert parse_transport("smtp:[IPv6:::1]:26").hosts == (HostPort("::1", 26),)


@pytest.mark.parametrize(
    ("text", "kind", "path"),
    [
        ("mx", "mx", ""),
        ("relay", "relay", ""),
        ("lmtp:unix:/run/lmtp", "lmtp", "/run/lmtp"),
        ("maildir:/var/mail/{local}/", "maildir", "/var/mail/{local}/"),
    ],
)
def test_other_kinds(text: str, kind: str, path: str) -> None:
    spec = parse_transport(text)
    assert (spec.kind, spec.path) == (kind, path)
    assert spec.text == text


def test_lmtp_tcp_default_port() -> None:
    assert parse_transport("lmtp:[10.0.0.7]").hosts == (HostPort("10.0.0.7", 24),)


@pytest.mark.parametrize(
    "bad", ["", "smtp:", "smtp:[x", "smtp:[a]:99999", "uucp:peer", "smtp:[a]:25, [b]:25", "maildir:"]
)
def test_bad_specs_are_refused_with_a_reason(bad: str) -> None:
    with pytest.raises(TransportSpecError):
        parse_transport(bad)


def test_first_match_wins_and_mx_is_the_fallback() -> None:
    router = Router(
        (
            RouteConfig("sales.example.com", "smtp:[10.0.0.2]:25"),
            RouteConfig("*.example.com", "smtp:[10.0.0.1]:25"),
            RouteConfig("example.com", "lmtp:[10.0.0.3]:24"),
        )
    )
    assert router.route("a@sales.example.com").spec.hosts[0].host == "10.0.0.2"
    assert router.route("a@eu.example.com").spec.hosts[0].host == "10.0.0.1"
    assert router.route("a@Example.COM").spec.kind == "lmtp"
    assert router.route("a@elsewhere.test").spec.kind == "mx"
