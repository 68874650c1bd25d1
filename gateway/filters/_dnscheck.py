"""What the filters that look a client or a name up in the DNS (helo, reverse-dns,
sender-domain) share: which outcome of a lookup is which verdict.

A name that does not exist is the filter's own refusal (or tag); a temporary
DNS failure is never a 5xx: no opinion, or with ``on_dns_failure = "defer"`` a
450; anything else is a bug, left to the runner's failure verdict.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.python.failure import Failure

from gateway.config import Section
from gateway.delivery.resolver import DnsTemporaryError, NoSuchDomain
from gateway.model import CONTINUE, Action, Verdict, peer_address

client_address = peer_address  # a session's peer host as an address, or None


def reply_code(options: Section, key: str, default: int) -> int:
    """The `key` option: 450 (the refusal is temporary) or 550 (permanent)."""
    code = options.take(key, int, default)
    if code not in (450, 550):
        meaning = {450: "450 (temporary)", 550: "550 (permanent)"}
        other = 550 if default == 450 else 450
        raise options.error(key, f"must be {meaning[default]} or {meaning[other]}, not {code}")
    return code


def refusal(reason: str, code: int, detail: str) -> Verdict:
    """A 550 REJECT (enhanced code 5.`detail`) or a 450 DEFER (4.`detail`), as `code` says."""
    if code == 550:
        return Verdict.reject(reason, 550, f"5.{detail}")
    return Verdict(Action.DEFER, reason, code=450, enhanced=f"4.{detail}")


def dns_failure(on_dns_failure: str, reason: str, enhanced: str = "4.7.1") -> Verdict:
    """The verdict on a temporary DNS failure: a 450 DEFER if "defer", else no opinion."""
    if on_dns_failure == "defer":
        return Verdict(Action.DEFER, reason, code=450, enhanced=enhanced)
    return CONTINUE


def lookup_failed(
    failure: Failure, not_found: Callable[[], Verdict], temporary: Callable[[], Verdict]
) -> Verdict | Failure:
    """`not_found()` for NXDOMAIN, `temporary()` for a DNS failure; anything else is passed on."""
    if isinstance(failure.value, NoSuchDomain):
        return not_found()
    if not isinstance(failure.value, DnsTemporaryError):
        return failure  # a bug: the runner's failure verdict
    return temporary()
