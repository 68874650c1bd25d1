"""How the filters that keep state (auto-whitelist, greylist, quota) name things in the store.

A client is known by its network (a /24 for IPv4, a /64 for IPv6, as postgrey
and SpamAssassin's AWL do: big senders retry from a neighbouring address), a
sender by its lower-cased address.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from gateway.config import Section
from gateway.model import Direction, peer_address


def client_network(host: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """The client's network as text ("192.0.2.0/24", "2001:db8::/64"); `host` itself if not an IP."""
    address = peer_address(host)
    if address is None:
        return host
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def prefixes(options: Section) -> tuple[int, int]:
    """The ``ipv4_prefix`` and ``ipv6_prefix`` options (24 and 64 by default), checked."""
    ipv4 = options.take("ipv4_prefix", int, 24)
    if not 8 <= ipv4 <= 32:
        raise options.error("ipv4_prefix", f"must be from 8 to 32, not {ipv4}")
    ipv6 = options.take("ipv6_prefix", int, 64)
    if not 16 <= ipv6 <= 128:
        raise options.error("ipv6_prefix", f"must be from 16 to 128, not {ipv6}")
    return ipv4, ipv6


def sender_key(address: str) -> str:
    """A sender address as the store knows it: lower case ("" stays "" for the null sender)."""
    return address.strip().lower()


_BATV = re.compile(r"^(?:prvs|btv1|msprvs1)=[^=]+=", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


def stable_sender(address: str) -> str:
    """A sender with what changes from one retry to the next taken out (as postgrey does too).

    BATV tags ("prvs=1234abcd=bob@...") and runs of digits in the local part
    (VERP and bounce addresses: "bounce-4711-bob=example.com@...") change on each
    attempt; the greylist must still recognise the retry.
    """
    local, at, domain = sender_key(address).rpartition("@")
    if not at:
        return sender_key(address)
    local = _DIGITS.sub("#", _BATV.sub("", local))
    return f"{local}@{domain}"


def chain_directions(options: Section, services: Any) -> frozenset[Direction]:
    """The directions whose chain lists this filter instance (its ``[filters.<name>]`` table).

    A filter told of every accepted message (IAcceptObserver) counts only the
    mail of its own chains.
    """
    name = options.path.removeprefix("filters.")
    filters = services.config.filters
    return frozenset(d for d in Direction if name in getattr(filters, d.value, ()))
