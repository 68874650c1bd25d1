"""Multidrop ("public mailbox"): which internal users a fetched message is for.

Pure functions over the message's header block. `route(config, fields,
unknown)` looks at the envelope headers in the configured order
(Delivered-To, X-Original-To, Envelope-To by default): the first one that
names any address of ours (a domain of `local_domains` or `domain_map`)
gives the recipients; when none does, To and Cc do (if `fallback`). An
address of ours becomes its `local_parts` entry, or the same local part in
the `domain_map` domain; an address of ours with neither (an unknown user),
and a message that names nobody of ours at all, add the `unknown` address
(the postmaster). So the recipient set is never empty: nothing is dropped.
"""

from __future__ import annotations

import email.utils
import hashlib

import attrs

from gateway.fetch.accounts import MultidropConfig

__all__ = ["Routing", "addresses", "duplicate_key", "header_fields", "header_values", "route"]

FALLBACK_HEADERS = ("To", "Cc")


@attrs.frozen
class Routing:
    """The recipients of one fetched message and how they were found (for the log)."""

    recipients: tuple[str, ...]  # internal addresses, distinct, in the order found
    source: str  # the header that named them: "Delivered-To", "To/Cc", or "" (nobody of ours)
    unknown: tuple[str, ...] = ()  # addresses of ours nobody is mapped to (sent to the unknown address)


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """(name, value) of each header field in a header block, unfolded, in order.

    Reads up to the first empty line; bytes that are not UTF-8 are kept as
    replacement characters (an address with them matches nothing of ours).
    Lines that are not fields (no colon) are skipped, as a lenient reader does.
    """
    fields: list[tuple[str, str]] = []
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            break
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if colon and name and not any(char.isspace() for char in name):
            fields.append((name, value.strip()))
    return fields


def header_values(fields: list[tuple[str, str]], name: str) -> list[str]:
    """The values of every field called `name` (any case), in order."""
    wanted = name.lower()
    return [value for field, value in fields if field.lower() == wanted]


def addresses(values: list[str]) -> list[str]:
    """The mail addresses in header values (display names, groups and comments dropped)."""
    found: list[str] = []
    for _name, address in email.utils.getaddresses(values):
        address = address.strip()
        if "@" in address and not any(char.isspace() for char in address):
            found.append(address)
    return found


def route(config: MultidropConfig, fields: list[tuple[str, str]], unknown: str) -> Routing:
    """The internal recipients of a message with these header fields (see the module docstring)."""
    sources = [(name, header_values(fields, name)) for name in config.headers]
    if config.fallback:
        sources.append(
            ("/".join(FALLBACK_HEADERS), [v for n in FALLBACK_HEADERS for v in header_values(fields, n)])
        )
    for source, values in sources:
        ours = [address for address in addresses(values) if _is_ours(config, address)]
        if ours:
            return _map(config, source, ours, unknown)
    return Routing((unknown,), "")


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _is_ours(config: MultidropConfig, address: str) -> bool:
    domain = _domain(address)
    return domain in config.local_domains or domain in config.domains


def _map(config: MultidropConfig, source: str, ours: list[str], unknown: str) -> Routing:
    recipients: list[str] = []
    missing: list[str] = []
    parts, domains = config.parts, config.domains

    def add(address: str) -> None:
        if address.lower() not in (known.lower() for known in recipients):
            recipients.append(address)

    for address in ours:
        local = address.rpartition("@")[0]
        target = parts.get(local.lower())
        if target is None and _domain(address) in domains:
            target = f"{local}@{domains[_domain(address)]}"
        if target is None:
            missing.append(address)
        else:
            add(target)
    if missing:
        add(unknown)
    return Routing(tuple(recipients), source, tuple(missing))


def duplicate_key(message_id: str, recipient: str) -> str:
    """The state-store key under which a copy of a message for a recipient is remembered."""
    text = f"{message_id.strip()}\0{recipient.lower()}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
