"""HELO/EHLO checks: syntax, a name or address that claims to be us, and (optionally) resolvability.

In the order they run, each switched on or off by its key:

- ``reject_invalid`` (on): the name must be a host name or an address literal
  (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), as Postfix's reject_invalid_helo_hostname
  (``501 5.5.2 <name>: Helo command rejected: Invalid name``). A bare IP address is
  invalid: RFC 5321 wants it in brackets.
- ``reject_own_name`` (on): the gateway's own host name (``gateway.hostname``) or one of
  ``own_names``; no other server has a reason to say it (``550 5.7.1``).
- ``reject_own_address`` (on): an address literal of one of our listening addresses or
  ``own_addresses``, or of a loopback address, from a client that is not on this host
  and not that address itself.
- ``reject_non_fqdn`` (off): a name without a dot, as reject_non_fqdn_helo_hostname
  (``504 5.5.2``). Off by default: some real mail servers say "EHLO exchange01".
- ``reject_unknown`` (off): the name has neither A/AAAA nor MX records, as
  reject_unknown_helo_hostname: ``unknown_code`` 450 (the default) or 550. A DNS failure
  is no opinion (``on_dns_failure = "continue"``) or a 450, never a 5xx.

The defaults reject only what no legitimate mail server does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Literal

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.delivery.resolver import NullMX
from gateway.filters import FilterServices, Request
from gateway.filters._dnscheck import (
    client_address,
    dns_failure,
    lookup_failed,
    refusal,
    reply_code,
)
from gateway.filters.dns import Lookups
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, IPAddress, Stage, Verdict

# letters, digits, hyphens inside; underscores too, which real hosts use and Postfix accepts
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$", re.IGNORECASE)
# a whole valid name: labels as _LABEL, the last not all digits, an optional final dot
# (hostname_problem says what is wrong with one that does not match)
_HOSTNAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    r"(?![0-9]+\.?\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?\Z",
    re.IGNORECASE,
)
_INTERFACE = re.compile(r"(?:^|:)interface=((?:\\.|[^:])*)")
_WILDCARDS = {"", "0.0.0.0", "::"}


def hostname_problem(name: str) -> str | None:
    """Why `name` is not a valid host name, or None when it is one."""
    if _HOSTNAME.match(name) and len(name) - name.endswith(".") <= 253:  # the usual name, in one match
        return None
    return _why_not_hostname(name)


def _why_not_hostname(name: str) -> str | None:
    """`hostname_problem`, label by label (and what it says when the one match fails)."""
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > 253:
        return "empty" if not bare else "longer than 253 characters"
    labels = bare.split(".")
    for label in labels:
        if not label:
            return "an empty label"
        if not _LABEL.match(label):
            return f"the label {label[:70]!r} is not letters, digits and inner hyphens"
    if labels[-1].isdigit():
        return "numeric (an address must be written [192.0.2.1])"
    return None


def address_literal(name: str) -> IPAddress | Literal[False] | None:
    """The address of ``[192.0.2.1]`` / ``[IPv6:...]``; False for a bad literal; None if not one."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return False


def listening_addresses(endpoints: Iterable[str]) -> set[IPAddress]:
    """The specific addresses of listener endpoint strings ("tcp:25:interface=192.0.2.1")."""
    found: set[IPAddress] = set()
    for endpoint in endpoints:
        match = _INTERFACE.search(endpoint)
        if match is None:
            continue
        interface = re.sub(r"\\(.)", r"\1", match.group(1))
        if interface in _WILDCARDS:
            continue
        try:
            found.add(ipaddress.ip_address(interface))
        except ValueError:
            continue
    return found


@implementer(IFilter)
class Helo:
    """Checks the HELO/EHLO name (see the module docstring)."""

    name = "helo"
    stages = frozenset({Stage.HELO})

    def __init__(
        self,
        dns: Lookups,
        *,
        own_names: Iterable[str] = (),
        own_addresses: Iterable[IPAddress] = (),
        reject_invalid: bool = True,
        reject_own_name: bool = True,
        reject_own_address: bool = True,
        reject_non_fqdn: bool = False,
        reject_unknown: bool = False,
        unknown_code: int = 450,
        on_dns_failure: str = "continue",
    ) -> None:
        self.dns = dns
        self.own_names = {name.rstrip(".").lower() for name in own_names if name}
        self.own_addresses = set(own_addresses)
        self.reject_invalid = reject_invalid
        self.reject_own_name = reject_own_name
        self.reject_own_address = reject_own_address
        self.reject_non_fqdn = reject_non_fqdn
        self.reject_unknown = reject_unknown
        self.unknown_code = unknown_code
        self.on_dns_failure = on_dns_failure

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Helo:
        own_names = [services.hostname, *options.strings("own_names")]
        own_addresses = listening_addresses(listener.endpoint for listener in services.config.smtp.listeners)
        for text in options.strings("own_addresses"):
            try:
                own_addresses.add(ipaddress.ip_address(text))
            except ValueError:
                raise options.error("own_addresses", f"{text!r} is not an IP address") from None
        return cls(
            services.dns,
            own_names=own_names,
            own_addresses=own_addresses,
            reject_invalid=options.take("reject_invalid", bool, True),
            reject_own_name=options.take("reject_own_name", bool, True),
            reject_own_address=options.take("reject_own_address", bool, True),
            reject_non_fqdn=options.take("reject_non_fqdn", bool, False),
            reject_unknown=options.take("reject_unknown", bool, False),
            unknown_code=reply_code(options, "unknown_code", 450),
            on_dns_failure=options.choice("on_dns_failure", ("continue", "defer"), "continue"),
        )

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        helo = request.session.helo
        if not helo:
            return CONTINUE
        literal = address_literal(helo) if helo[0] == "[" else None  # a name, usually
        if literal is False or (literal is None and hostname_problem(helo) is not None):
            if self.reject_invalid:
                return Verdict.reject(f"<{helo}>: Helo command rejected: Invalid name", 501, "5.5.2")
            return CONTINUE
        if literal is not None:  # an address (False, a bad literal, was answered above)
            if self.reject_own_address and self._claims_our_address(literal, request.session.peer_host):
                return self._not_us(helo)
            return CONTINUE  # an address literal has nothing to resolve
        name = helo.rstrip(".").lower()
        if self.reject_own_name and name in self.own_names:
            return self._not_us(helo)
        if self.reject_non_fqdn and "." not in name:
            return Verdict.reject(
                f"<{helo}>: Helo command rejected: need fully-qualified hostname", 504, "5.5.2"
            )
        if self.reject_unknown:
            return self._resolve(helo, name)
        return CONTINUE

    def _claims_our_address(self, literal: IPAddress, peer: str) -> bool:
        client = client_address(peer)
        if client is None or client.is_loopback or client == literal:
            return False  # a client on this host, or one telling the truth about itself
        mapped = literal.ipv4_mapped if isinstance(literal, ipaddress.IPv6Address) else None
        return literal.is_loopback or literal in self.own_addresses or mapped in self.own_addresses

    def _not_us(self, helo: str) -> Verdict:
        return Verdict.reject(
            f"<{helo}>: Helo command rejected: that is this server's name or address", 550, "5.7.1"
        )

    def _resolve(self, helo: str, name: str) -> Deferred[Verdict]:
        def addresses(found: list[str]) -> Verdict | Deferred[Verdict]:
            if found:
                return CONTINUE
            return self.dns.mx(name).addCallbacks(exchangers, failed)

        def exchangers(hosts: list[tuple[int, str]]) -> Verdict:
            return CONTINUE if hosts else self._unknown(helo)

        def failed(failure: Failure) -> Verdict | Failure:
            if isinstance(failure.value, NullMX):
                return CONTINUE  # an MX record, if a null one: the name is in the DNS
            return lookup_failed(failure, lambda: self._unknown(helo), temporary)

        def temporary() -> Verdict:
            reason = f"<{helo}>: Helo command rejected: Host not found, try again later"
            return dns_failure(self.on_dns_failure, reason)

        return self.dns.addresses(name).addCallbacks(addresses, failed)

    def _unknown(self, helo: str) -> Verdict:
        return refusal(f"<{helo}>: Helo command rejected: Host not found", self.unknown_code, "7.1")
