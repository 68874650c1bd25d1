"""The "lists" filter: allow and block lists by client, port, sender and recipient.

Layer 1 of the defences, and the cheapest: put it first in a chain. At CONNECT
it looks up the client's address (IP or CIDR entries, IPv4 and IPv6) and the
listening port; at MAIL the sender; at RCPT each recipient. A blocked one gets
``554 5.7.1 Access denied: ...`` naming what matched (never where it is listed).
An allowed one gets ACCEPT, which skips the rest of *that stage* of the chain
(as OK does in one Postfix restriction list): an allowed client skips the other
connect checks, not the sender or recipient ones.

Within a kind the most specific entry wins (the longest network prefix; an
address before its domain, a sub-domain before its parent), and allow wins over
block for the same entry. At CONNECT a listed client decides before the port.

Entries are written inline in ``[filters.lists]`` or in list files
(`gateway.filters._listfile`); `reload()` re-reads the files, and keeps the old
lists when one of them is bad.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Mapping

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._listfile import (
    PARSERS,
    Entry,
    Kind,
    Network,
    Pattern,
    check_entry,
    domain_key,
    read_list_file,
)
from gateway.interfaces import IFilter, IReloadable
from gateway.model import CONTINUE, Action, Stage, Verdict, peer_address

log = Logger(namespace="mailgate.filter.lists")

# the stage each kind of list is looked up at
STAGE_OF = {
    Kind.CLIENTS: Stage.CONNECT,
    Kind.PORTS: Stage.CONNECT,
    Kind.SENDERS: Stage.MAIL,
    Kind.RECIPIENTS: Stage.RCPT,
}

ListKey = tuple[Kind, bool]  # (kind, allowed)


def option_name(kind: Kind, allowed: bool) -> str:
    """The option holding one list inline: "allow_clients", "block_senders", ..."""
    return f"{'allow' if allowed else 'block'}_{kind.value}"


@attrs.frozen
class Listing:
    """What a lookup found: allowed or blocked, and how the reason names the match."""

    allowed: bool
    what: str = ""  # "domain usa.com", "<user@usa.com>"; "" where the reason names the client


def _merge(old: Listing | None, new: Listing) -> Listing:
    # an entry in both lists is allowed: allow entries are the exceptions to blocks
    return old if old is not None and old.allowed else new


class NetworkTable:
    """IP networks to listings; the longest matching prefix wins.

    One hash table per prefix length, keyed by the network's leading bits: a
    lookup costs one probe per distinct prefix length present (a handful in
    practice, at most 33 or 129), whatever the number of entries.
    """

    def __init__(self) -> None:
        self._by_version: dict[int, dict[int, dict[int, Listing]]] = {4: {}, 6: {}}
        self._lengths: dict[int, tuple[int, ...]] = {4: (), 6: ()}

    def __len__(self) -> int:
        return sum(len(t) for tables in self._by_version.values() for t in tables.values())

    def add(self, network: Network, listing: Listing) -> None:
        tables = self._by_version[network.version]
        length = network.prefixlen
        key = int(network.network_address) >> (network.max_prefixlen - length)
        table = tables.get(length)
        if table is None:
            table = tables[length] = {}
            self._lengths[network.version] = tuple(sorted(tables, reverse=True))
        table[key] = _merge(table.get(key), listing)

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Listing | None:
        tables = self._by_version[address.version]
        value = int(address)
        bits = address.max_prefixlen
        for length in self._lengths[address.version]:
            found = tables[length].get(value >> (bits - length))
            if found is not None:
                return found
        return None


class PatternTable:
    """Addresses and domains to listings: the address first, then its domain upwards."""

    def __init__(self) -> None:
        self.addresses: dict[str, Listing] = {}
        self.domains: dict[str, Listing] = {}

    def __len__(self) -> int:
        return len(self.addresses) + len(self.domains)

    def add(self, pattern: Pattern, allowed: bool) -> None:
        if pattern.domain:
            self.domains[pattern.value] = _merge(
                self.domains.get(pattern.value), Listing(allowed, f"domain {pattern.value}")
            )
        else:
            self.addresses[pattern.value] = _merge(
                self.addresses.get(pattern.value), Listing(allowed, f"<{pattern.value}>")
            )

    def lookup(self, address: str) -> Listing | None:
        if not self.domains and not self.addresses:
            return None  # an empty list (no recipients listed, say): nothing to parse
        local, at, domain = address.rpartition("@")
        if not at:  # the null sender, or a bare "postmaster": no entry names them
            return None
        name = domain_key(domain)
        if name is None:
            return None
        if self.addresses:
            found = self.addresses.get(f"{local.lower()}@{name}")
            if found is not None:
                return found
        while True:
            found = self.domains.get(name)
            if found is not None:
                return found
            dot = name.find(".")
            if dot < 0:
                return None
            name = name[dot + 1 :]


@attrs.frozen
class Tables:
    """Every list, ready for lookups; replaced whole by a reload."""

    clients: NetworkTable
    ports: dict[int, Listing]
    senders: PatternTable
    recipients: PatternTable
    files: int = 0

    @property
    def entries(self) -> int:
        return len(self.clients) + len(self.ports) + len(self.senders) + len(self.recipients)


def build_tables(
    inline: Mapping[ListKey, tuple[str, ...]], files: Mapping[ListKey, tuple[str, ...]]
) -> Tables:
    """Parse every entry, inline and from the files; ConfigError (file, line) on a bad one."""
    tables = Tables(NetworkTable(), {}, PatternTable(), PatternTable(), sum(len(p) for p in files.values()))
    for key in sorted(set(inline) | set(files), key=lambda k: (k[0].value, k[1])):
        entries = [Entry(text, "<config>") for text in inline.get(key, ())]
        for path in files.get(key, ()):
            entries.extend(read_list_file(path))
        kind, allowed = key
        for entry in entries:
            value = check_entry(kind, entry)
            if kind is Kind.CLIENTS:
                assert isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                tables.clients.add(value, Listing(allowed))
            elif kind is Kind.PORTS:
                assert isinstance(value, int)
                tables.ports[value] = _merge(tables.ports.get(value), Listing(allowed))
            else:
                assert isinstance(value, Pattern)
                (tables.senders if kind is Kind.SENDERS else tables.recipients).add(value, allowed)
    return tables


@functools.lru_cache(maxsize=256)
@functools.lru_cache(maxsize=64)  # a gateway has a few listeners, and a connection each time
def listener_port(endpoint: str) -> int | None:
    """The port of a listener's endpoint string ("tcp:25:interface=..." -> 25); None if none."""
    kind, *arguments = re.split(r"(?<!\\):", endpoint)
    if kind not in ("tcp", "tcp6", "ssl", "tls"):
        return None
    positional = [a for a in arguments if "=" not in a]
    named = dict(a.split("=", 1) for a in arguments if "=" in a)
    text = named.get("port", positional[0] if positional else "")
    return int(text) if text.isdigit() else None


@implementer(IFilter, IReloadable)
class Lists:
    """Allow and block lists; `stages` are those of the lists configured."""

    name = "lists"
    stages = frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT})

    def __init__(
        self,
        inline: Mapping[ListKey, tuple[str, ...]],
        files: Mapping[ListKey, tuple[str, ...]] | None = None,
    ) -> None:
        self.inline = dict(inline)
        self.files = dict(files or {})
        configured = {kind for (kind, _), values in [*self.inline.items(), *self.files.items()] if values}
        self.stages = frozenset(STAGE_OF[kind] for kind in configured)
        self.tables = build_tables(self.inline, self.files)

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Lists:
        base = (
            os.path.dirname(os.path.abspath(options.source))
            if not options.source.startswith("<")
            else os.getcwd()
        )
        inline: dict[ListKey, tuple[str, ...]] = {}
        files: dict[ListKey, tuple[str, ...]] = {}
        for kind in Kind:
            for allowed in (True, False):
                key = option_name(kind, allowed)
                entries = _ports(options, key) if kind is Kind.PORTS else options.strings(key)
                for text in entries:
                    try:
                        PARSERS[kind](text)
                    except ValueError as error:
                        raise options.error(key, str(error)) from None
                inline[kind, allowed] = entries
                paths = options.strings(f"{key}_files")
                files[kind, allowed] = tuple(os.path.normpath(os.path.join(base, p)) for p in paths)
        return cls(inline, files)

    def reload(self) -> None:
        """Re-read the list files; on a bad one raise ConfigError and keep the old lists."""
        self.tables = build_tables(self.inline, self.files)
        log.info(
            "lists reloaded: {entries} entries, {files} list file(s)",
            entries=self.tables.entries,
            files=self.tables.files,
        )

    def check(self, request: Request) -> Verdict:
        tables = self.tables  # one snapshot: a reload swaps the whole object
        if request.stage is Stage.CONNECT:
            return self._connect(request, tables)
        if request.stage is Stage.MAIL and request.envelope is not None:
            return _decide("sender", tables.senders.lookup(request.envelope.mail_from))
        if request.stage is Stage.RCPT and request.recipient is not None:
            return _decide("recipient", tables.recipients.lookup(request.recipient.address))
        return CONTINUE

    def _connect(self, request: Request, tables: Tables) -> Verdict:
        peer = request.session.peer_host
        address = peer_address(peer)
        found = tables.clients.lookup(address) if address is not None else None
        if found is not None:
            if found.allowed:
                return Verdict(Action.ACCEPT, f"client {peer} is allowed")
            return Verdict.reject(f"Access denied: client {peer} is blocked")
        if not tables.ports:
            return CONTINUE
        port = listener_port(request.session.listener)
        found = tables.ports.get(port) if port is not None else None
        if found is not None:
            if found.allowed:
                return Verdict(Action.ACCEPT, f"port {port} is allowed")
            return Verdict.reject(f"Access denied: client {peer} may not use port {port}")
        return CONTINUE


def _decide(role: str, found: Listing | None) -> Verdict:
    if found is None:
        return CONTINUE
    if found.allowed:
        return Verdict(Action.ACCEPT, f"{role} {found.what} is allowed")
    return Verdict.reject(f"Access denied: {role} {found.what} is blocked")


def _ports(options: Section, key: str) -> tuple[str, ...]:
    values = options.take(key, list, [])
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise options.error(key, f"must be a list of port numbers; {value!r} is not one")
    return tuple(str(value) for value in values)
