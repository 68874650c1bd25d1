"""List files, and the entries of the "lists" filter.

A list file holds one entry per line; ``#`` starts a comment (at the start of
a line, or after a blank inside one, since ``#`` may appear in a local part);
blank lines are ignored. `read_list_file`, `parse_at` and `domain_key` serve
every filter that reads such files ("lists", and the "recipients" list).

For "lists", an entry is a client (an IP address or a CIDR network, IPv4 or IPv6), a
listening port, or an address pattern (``user@example.com`` for one address;
``@example.com`` or ``example.com`` for a domain and all its sub-domains). A
bad entry is a `ConfigError` naming the file and line: at start-up it stops
the gateway, at a reload the old lists are kept.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from typing import TypeVar

import attrs

from gateway.config import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

# dot-separated labels of 1-63 letters, digits, "_" and "-", no label starting or ending with "-"
_DOMAIN = re.compile(r"(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class Kind(enum.Enum):
    """What a list holds, which decides how its entries are written."""

    CLIENTS = "clients"
    PORTS = "ports"
    SENDERS = "senders"
    RECIPIENTS = "recipients"


@attrs.frozen
class Pattern:
    """An address pattern: one address, or a domain with its sub-domains."""

    value: str  # "user@example.com" or "example.com", lower case
    domain: bool  # True: the domain and every sub-domain


@attrs.frozen
class Entry:
    """One list line, as text, with where it was written (for error messages)."""

    text: str
    source: str  # a file path, or "<config>" for an inline entry
    line: int | None = None


def parse_client(text: str) -> Network:
    """An IP address or network; an IPv4-mapped IPv6 one becomes its IPv4 form."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address or network (like 192.0.2.1 or 2001:db8::/32)"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parse_pattern(text: str) -> Pattern:
    """``user@example.com``, ``@example.com`` or ``example.com`` (both: and its sub-domains)."""
    local, _, domain = text.lower().rpartition("@")
    key = domain_key(domain)
    if key is None or key.rpartition(".")[2].isdigit():  # an all-numeric last label: an IP address
        raise ValueError(
            f"{text!r} is not an address or a domain (like user@example.com, @example.com or example.com)"
        )
    if local:
        return Pattern(f"{local}@{key}", domain=False)
    return Pattern(key, domain=True)


def domain_key(domain: str) -> str | None:
    """A domain as list entries compare it (lower case ASCII, no final dot), or None if it is not one.

    An internationalised domain is compared in its ASCII (A-label) form, so that
    an entry and an address match however either was written.
    """
    domain = domain.lower().rstrip(".")
    if not domain or len(domain) > 253:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not _DOMAIN.match(domain):
        return None
    return domain


PARSERS = {
    Kind.CLIENTS: parse_client,
    Kind.PORTS: parse_port,
    Kind.SENDERS: parse_pattern,
    Kind.RECIPIENTS: parse_pattern,
}


def read_list_file(path: str, what: str = "list file", per_line: str = "entry") -> list[Entry]:
    """The entries of a list file, in order; ConfigError if it cannot be read or a line is bad.

    `what` names the file and `per_line` its entries in those errors ("recipient list", "address").
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ConfigError(path, "", f"cannot read the {what}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, "", f"the {what} is not UTF-8 text (byte {error.start})") from None
    entries = []
    for number, raw in enumerate(lines, 1):
        text = strip_comment(raw)
        if not text:
            continue
        if len(text.split()) > 1:
            raise ConfigError(path, "", f"one {per_line} per line, not {text!r}", number)
        entries.append(Entry(text, path, number))
    return entries


def strip_comment(line: str) -> str:
    """A list file line without its comment and surrounding blanks ("" if nothing is left)."""
    line = line.strip()
    if "#" not in line:
        return line
    if line.startswith("#"):
        return ""
    return re.split(r"\s#", line, maxsplit=1)[0].strip()


def parse_at(entry: Entry, parse: Callable[[str], T]) -> T:
    """`parse(entry.text)`; its ValueError becomes a ConfigError naming the entry's file and line."""
    try:
        return parse(entry.text)
    except ValueError as error:
        raise ConfigError(entry.source, "", str(error), entry.line) from None


def check_entry(kind: Kind, entry: Entry) -> object:
    """The parsed form of `entry` (see PARSERS); ConfigError naming its file and line if bad."""
    return parse_at(entry, PARSERS[kind])
