"""Who our recipients are: the answers a recipient directory gives, and the static list.

A directory answers `lookup(address)` with a `Lookup` (or a Deferred of one):
the address is VALID, UNKNOWN (no such user), or UNVERIFIED (nobody can tell
right now: the client should try again later). The "recipients" filter turns
those into verdicts; this module knows nothing of SMTP replies.

`RecipientList` is the static directory: addresses written inline in the config
and in files. A file holds one entry per line: ``user@example.com`` for one
address, ``@example.com`` for every address of a domain (that domain only, not
its sub-domains). ``#`` starts a comment at the start of a line or after a
blank (``#`` may appear in a local part). Addresses compare without regard to
case; a domain in either form of an internationalised name. A bad line is a
`ConfigError` naming the file and line: at start-up it stops the gateway, at a
reload the old list is kept.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred

from gateway.filters._listfile import Entry, domain_key, parse_at, read_list_file


class Answer(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"  # no such user: 550 5.1.1
    UNVERIFIED = "unverified"  # nobody knows yet: 450 4.1.1, never a 5xx


@attrs.frozen
class Lookup:
    """What a directory says about one address, and why (for the log, not the client)."""

    answer: Answer
    detail: str = ""


class RecipientDirectory(Protocol):
    """Where the "recipients" filter asks about an address."""

    def lookup(self, address: str) -> Lookup | Deferred[Lookup]: ...

    def reload(self) -> None: ...


# the answers that name no address (frozen: one serves every lookup)
_ACCEPT_ALL = Lookup(Answer.VALID, "accept-all")
_LISTED = Lookup(Answer.VALID, "listed")
_DOMAIN_LISTED = Lookup(Answer.VALID, "domain listed")
_NOT_LISTED = Lookup(Answer.UNKNOWN, "not in the recipient list")


class AcceptAll:
    """Every address of our domains is valid."""

    def lookup(self, address: str) -> Lookup:
        return _ACCEPT_ALL

    def reload(self) -> None:
        pass


def address_key(address: str) -> str:
    """An address as the list and the callout cache compare it: lower case, domain in ASCII."""
    local, _, domain = address.rpartition("@")
    return f"{local.lower()}@{domain_key(domain) or domain.lower()}"


@attrs.frozen
class Entries:
    """A parsed list: single addresses, and whole domains."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.addresses) + len(self.domains)


def parse_entry(text: str) -> tuple[str, bool]:
    """``user@example.com`` -> (address key, False); ``@example.com`` -> (domain, True).

    Raises ValueError with a readable reason.
    """
    local, at, domain = text.rpartition("@")
    key = domain_key(domain) if at else None
    if key is None or any(c in local for c in '<>"\\ \t') or any(ord(c) < 32 for c in text):
        raise ValueError(f"{text!r} is not an address or a domain (write user@example.com or @example.com)")
    if not local:
        return key, True
    return f"{local.lower()}@{key}", False


class RecipientList:
    """The static directory: inline entries plus files, re-read by `reload()`."""

    def __init__(self, inline: Iterable[str] = (), files: Iterable[str] = (), source: str = "<config>"):
        """`inline` entries must already be valid (`parse_entry`); `files` are read now."""
        self.inline = tuple(inline)
        self.files = tuple(files)
        self.source = source
        self.entries = self._load()

    def _load(self) -> Entries:
        entries = [Entry(text, self.source) for text in self.inline]
        for path in self.files:
            entries.extend(read_list_file(path, "recipient list", "address"))
        addresses: set[str] = set()
        domains: set[str] = set()
        for entry in entries:
            key, domain = parse_at(entry, parse_entry)
            (domains if domain else addresses).add(key)
        return Entries(frozenset(addresses), frozenset(domains))

    def lookup(self, address: str) -> Lookup:
        key = address_key(address)
        entries = self.entries
        if key in entries.addresses:
            return _LISTED
        if key.rpartition("@")[2] in entries.domains:
            return _DOMAIN_LISTED
        return _NOT_LISTED

    def reload(self) -> None:
        """Re-read the files; on a bad one raise ConfigError and keep the list as it was."""
        self.entries = self._load()
