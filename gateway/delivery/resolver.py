"""DNS for delivery: MX and address lookups returning Deferreds (`IResolver`).

`DnsResolver` runs dnspython's blocking resolver in its own bounded thread pool
(never the reactor's shared default pool, which `getaddrinfo` also uses), with
an LRU cache. `StaticResolver` answers from a dict shaped like a zone, for
tests; both go through the same contract tests and share the rules below:

- MX answers sorted by preference; no MX records -> [] (implicit MX);
  a lone MX "." -> `NullMX` (RFC 7505);
- NXDOMAIN -> `NoSuchDomain`; SERVFAIL, REFUSED, timeouts -> `DnsTemporaryError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gateway.interfaces import IResolver


class NullMX(Exception):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


class DnsTemporaryError(Exception):
    """SERVFAIL, a refusal or a timeout: try again later."""


def mx_answer(domain: str, records: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """Sorted [(preference, host)] from raw MX records; NullMX for RFC 7505's "."."""
    hosts = [(preference, host.rstrip(".").lower()) for preference, host in records]
    real = [(preference, host) for preference, host in hosts if host]
    if hosts and not real:
        raise NullMX(f"{domain} has a null MX: it accepts no mail")
    return sorted(real)


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    from gateway.filters._dnsquery import parse_nameserver  # (it imports our errors)

    host, port = parse_nameserver(text)  # checked when the config was read
    return dns.nameserver.Do53Nameserver(host, port)


@implementer(IResolver)
class DnsResolver(Service):
    """dnspython in a dedicated thread pool; start it with the service tree."""

    def __init__(
        self,
        reactor: object,
        nameservers: Sequence[str] | None = None,
        timeout: float = 5.0,
        threads: int = 8,
        cache_size: int = 10000,
    ) -> None:
        self.reactor = reactor
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [_nameserver(text) for text in nameservers]
        else:
            self.resolver = dns.resolver.Resolver(configure=True)
        self.resolver.lifetime = timeout
        self.resolver.timeout = min(timeout, 2.0)
        self.resolver.cache = dns.resolver.LRUCache(cache_size)
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="mailgate-dns")

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.pool.stop()

    start = startService
    stop = stopService

    def lookup_mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        return deferToThreadPool(self.reactor, self.pool, self._mx, domain)  # type: ignore[arg-type]

    def lookup_addresses(self, host: str) -> Deferred[list[str]]:
        return deferToThreadPool(self.reactor, self.pool, self._addresses, host)  # type: ignore[arg-type]

    def _query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
        """The records, or None for NODATA; our errors for the rest."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError) as error:
            raise NoSuchDomain(f"{name}: not a domain name ({error})") from None
        try:
            answer = self.resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(f"Name service error for name={name} type={rdtype}: Host not found") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as error:
            raise DnsTemporaryError(
                f"Name service error for name={name} type={rdtype}: Host not found, try again ({error})"
            ) from None
        except dns.exception.DNSException as error:
            raise DnsTemporaryError(f"Name service error for name={name} type={rdtype}: {error}") from None
        return list(answer)

    def _mx(self, domain: str) -> list[tuple[int, str]]:
        records = self._query(domain, "MX") or []
        return mx_answer(domain, ((r.preference, r.exchange.to_text()) for r in records))  # type: ignore[attr-defined]

    def _addresses(self, host: str) -> list[str]:
        found: list[str] = []
        temporary: DnsTemporaryError | None = None
        for rdtype in ("A", "AAAA"):  # IPv4 first: it works from more places
            try:
                found.extend(r.to_text() for r in self._query(host, rdtype) or [])
            except DnsTemporaryError as error:
                temporary = error
        if not found and temporary is not None:
            raise temporary
        return found


ZoneEntry = Mapping[str, Sequence[object]] | Exception


@implementer(IResolver)
class StaticResolver:
    """An IResolver answering from a dict, for tests.

    ``{"example.com": {"MX": [(10, "mx.example.com")]}, "mx.example.com": {"A":
    ["192.0.2.1"]}, "broken.example": DnsTemporaryError("SERVFAIL")}``; a name
    not in the dict is NXDOMAIN, a name without the record type is NODATA.
    """

    def __init__(self, zone: Mapping[str, ZoneEntry]) -> None:
        self.zone = {name.rstrip(".").lower(): entry for name, entry in zone.items()}
        self.queries: list[tuple[str, str]] = []

    def _records(self, name: str, rdtype: str) -> Sequence[object]:
        self.queries.append((name, rdtype))
        entry = self.zone.get(name.rstrip(".").lower())
        if entry is None:
            raise NoSuchDomain(f"Name service error for name={name} type={rdtype}: Host not found")
        if isinstance(entry, Exception):
            raise entry
        return entry.get(rdtype, ())

    def lookup_mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        try:
            records = self._records(domain, "MX")
            return succeed(mx_answer(domain, records))  # type: ignore[arg-type]
        except Exception as error:
            return fail(error)

    def lookup_addresses(self, host: str) -> Deferred[list[str]]:
        try:
            return succeed([str(a) for t in ("A", "AAAA") for a in self._records(host, t)])
        except Exception as error:
            return fail(error)
