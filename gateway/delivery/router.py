"""The route table: which transport each recipient leaves by.

Transport specs, as written in `[[routes]]`:

- ``smtp:[host]:port, smtp:[host2]:port`` directed delivery, hosts tried in order;
- ``mx`` DNS MX delivery; ``relay`` the upstream smart host (`[upstream]`);
- ``lmtp:[host]:port`` or ``lmtp:unix:/path/to/socket``;
- ``maildir:/path/{domain}/{local}/`` a local Maildir (``{local}``, ``{domain}``,
  ``{address}`` are filled in per recipient).

The first route whose `match` fits the recipient's domain wins; a domain that no
route matches falls back to ``mx`` (as Postfix's default transport would).
"""

from __future__ import annotations

import re

import attrs

from gateway.config import RouteConfig, domain_matches


class TransportSpecError(ValueError):
    """A transport spec that cannot be parsed."""


@attrs.frozen
class HostPort:
    host: str
    port: int
    mx_lookup: bool = False  # "smtp:host" without brackets: look up MX (Postfix's rule)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if not self.mx_lookup else f"{self.host}:{self.port}"


@attrs.frozen
class TransportSpec:
    """A parsed transport spec."""

    kind: str  # smtp / mx / relay / lmtp / maildir
    hosts: tuple[HostPort, ...] = ()  # smtp, lmtp over TCP
    path: str = ""  # maildir template, lmtp unix socket

    @property
    def text(self) -> str:
        if self.kind in ("mx", "relay"):
            return self.kind
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        if self.kind == "lmtp" and self.path:
            return f"lmtp:unix:{self.path}"
        return ", ".join(f"{self.kind}:{hp}" for hp in self.hosts)


_HOSTPORT = re.compile(r"^(?:\[(?P<literal>[^\]]+)\]|(?P<name>[A-Za-z0-9.\-]+))(?::(?P<port>\d+))?$")


def parse_host_port(text: str, default_port: int) -> HostPort:
    match = _HOSTPORT.match(text.strip())
    if not match:
        raise TransportSpecError(f'{text!r} is not a host: use "[host]:port" or "[192.0.2.1]:25"')
    port = int(match.group("port") or default_port)
    if not 0 < port < 65536:
        raise TransportSpecError(f"port {port} is out of range")
    if match.group("literal"):
        host = match.group("literal")
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        return HostPort(host, port)
    return HostPort(match.group("name"), port, mx_lookup=True)


def parse_transport(spec: str) -> TransportSpec:
    """Parse a transport spec; raise TransportSpecError with a readable reason."""
    spec = spec.strip()
    if spec in ("mx", "relay"):
        return TransportSpec(spec)
    if spec.startswith("maildir:"):
        path = spec[len("maildir:") :]
        if not path:
            raise TransportSpecError('maildir: needs a directory, like "maildir:/var/mail/{local}/"')
        return TransportSpec("maildir", path=path)
    if spec.startswith("lmtp:unix:"):
        return TransportSpec("lmtp", path=spec[len("lmtp:unix:") :])
    if spec.startswith("lmtp:"):
        return TransportSpec("lmtp", hosts=(parse_host_port(spec[5:], 24),))
    if spec.startswith("smtp:"):
        hosts = []
        for part in spec.split(","):
            part = part.strip()
            if not part.startswith("smtp:"):
                raise TransportSpecError(f"{part!r}: each host of a failover list starts with smtp:")
            hosts.append(parse_host_port(part[5:], 25))
        return TransportSpec("smtp", hosts=tuple(hosts))
    raise TransportSpecError(
        f"unknown transport {spec!r}: use smtp:[host]:port, mx, relay, lmtp:..., or maildir:..."
    )


@attrs.frozen
class Route:
    match: str
    spec: TransportSpec
    tls: str = "may"


class Router:
    """Maps recipient addresses to routes, first match wins."""

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self.routes = tuple(Route(r.match, parse_transport(r.transport), r.tls) for r in routes)
        self.default = Route("*", TransportSpec("mx"))

    def route(self, address: str) -> Route:
        domain = address.rpartition("@")[2] if "@" in address else ""
        for route in self.routes:
            if domain_matches(domain, (route.match,)):
                return route
        return self.default
