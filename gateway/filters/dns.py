"""Asynchronous DNS for filters: addresses, TXT, PTR, MX, and the A lookups of DNSBLs.

`DnsLookups` is what `FilterServices.dns` gives filters. Every method returns a
Deferred and nothing blocks or waits on a thread: a session waiting on a slow
DNSBL costs one small object, and a thousand of them wait side by side.

Why dnspython messages over Twisted UDP (`gateway.filters._dnsquery`) rather
than twisted.names' `client.Resolver`: the latter opens a new UDP socket for
every query (a thousand lookups in flight are a thousand file descriptors),
its cache has no size bound and no negative caching, and its errors are its
own. dnspython, which delivery already uses, parses the uncommon answers
(CNAME chains, TXT, MX, truncation); the common ones (a DNSBL's A records, any
NXDOMAIN or NODATA with its SOA) are read by hand (`_dnswire`), held to
dnspython by property tests. A small querier of our own carries the questions
on a few sockets with random ports and ids, retransmits, and turns to TCP for
a truncated answer.

Rules shared with the fake (`StaticDnsLookups`), checked by the same contract
tests (tests/unit/test_filter_dns.py):

- NXDOMAIN -> `NoSuchDomain`; SERVFAIL, REFUSED, timeouts -> `DnsTemporaryError`
  (both from `gateway.delivery.resolver`); a name that exists without the
  record type (NODATA) -> an empty list. `a()` is the DNSBL lookup: there
  NXDOMAIN and NODATA both mean "not listed", an empty list.
- `mx()` is sorted by preference; a lone MX "." -> `NullMX` (RFC 7505).
- `addresses()` gives the A records, then the AAAA ones.
- Names are compared without case and without a trailing dot; a string that is
  no DNS name (an empty label, a label over 63 octets) does not exist.

Answers are cached by their TTL in a bounded LRU; negative ones (NXDOMAIN,
NODATA) by their SOA's minimum, or `negative_ttl` when there is no SOA;
temporary failures are not cached. Concurrent lookups of one name and type
share one question.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import ConfigError, DnsConfig
from gateway.delivery.resolver import DnsTemporaryError, NoSuchDomain, NullMX, mx_answer
from gateway.filters._dnsquery import (
    DnsQuerier,
    Response,
    Server,
    normal_wire_name,
    parse_nameserver,
    wire_name,
)
from gateway.filters._dnswire import Reply

__all__ = [
    "DnsLookups",
    "DnsTemporaryError",
    "Lookups",
    "NoSuchDomain",
    "NullMX",
    "StaticDnsLookups",
    "reverse_name",
]

log = Logger(namespace="mailgate.dns")

CACHE_SIZE = 10_000
NEGATIVE_TTL = 60.0  # a negative answer without SOA (rbldnsd without $SOA)
MAX_TTL = 86_400.0
MAX_NEGATIVE_TTL = 3 * 3600.0  # RFC 2308 section 5
_CNAME_HOPS = 8


@attrs.frozen
class _Answer:
    """What a name server said about (name, type): the values, or that the name does not exist."""

    values: tuple[Any, ...] = ()
    exists: bool = True


_NOT_FOUND = _Answer((), exists=False)
_NO_RECORDS = _Answer()
_RDTYPES = {"A": 1, "AAAA": 28, "TXT": 16, "PTR": 12, "MX": 15}  # dnspython's numbers, looked up once


def normal_name(name: str) -> str:
    """The cache key form of a name: lower case, no trailing dot."""
    return name.strip().rstrip(".").lower()


def reverse_name(address: str) -> str:
    """The PTR name of an IP address: "7.2.0.192.in-addr.arpa", nibbles under ip6.arpa."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.reverse_pointer


def _value(rdtype: str, rdata: Any) -> Any:
    if rdtype in ("A", "AAAA"):
        return str(rdata.address)
    if rdtype == "TXT":
        return "".join(part.decode("utf-8", "replace") for part in rdata.strings)
    if rdtype == "PTR":
        return normal_name(rdata.target.to_text())
    if rdtype == "MX":
        return (int(rdata.preference), normal_name(rdata.exchange.to_text()))
    raise ValueError(f"unsupported record type {rdtype}")


def interpret(response: Response, rdtype: str, negative_ttl: float = NEGATIVE_TTL) -> tuple[_Answer, float]:
    """(answer, seconds it may be cached) from a NOERROR or NXDOMAIN response to one question."""
    if isinstance(response, Reply):
        return _interpret_reply(response, negative_ttl)
    if response.rcode() == dns.rcode.NXDOMAIN:
        return _NOT_FOUND, _negative_ttl(response, negative_ttl)
    wanted = dns.rdatatype.from_text(rdtype)
    name = response.question[0].name
    ttls: list[float] = []
    for _ in range(_CNAME_HOPS):
        rrset = response.get_rrset(response.answer, name, dns.rdataclass.IN, wanted)
        if rrset is not None:
            ttls.append(rrset.ttl)
            return _Answer(tuple(_value(rdtype, rdata) for rdata in rrset)), min(min(ttls), MAX_TTL)
        alias = response.get_rrset(response.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if alias is None:
            break
        ttls.append(alias.ttl)
        name = alias[0].target
    return _Answer(), _negative_ttl(response, negative_ttl)


def _interpret_reply(reply: Reply, negative_ttl: float) -> tuple[_Answer, float]:
    """`interpret` for an answer read by hand (no CNAMEs there: those go to dnspython)."""
    if reply.rcode != dns.rcode.NXDOMAIN and reply.ttl is not None:
        return _Answer(reply.values), min(reply.ttl, MAX_TTL)
    negative = (
        negative_ttl if reply.negative_ttl is None else float(min(reply.negative_ttl, MAX_NEGATIVE_TTL))
    )
    return (_NOT_FOUND if reply.rcode == dns.rcode.NXDOMAIN else _NO_RECORDS), negative


def _negative_ttl(response: dns.message.Message, default: float) -> float:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL))
    return default


def system_nameservers() -> list[Server]:
    """The name servers of /etc/resolv.conf (127.0.0.1 when it has none, as the C library does)."""
    try:
        resolver = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return [("127.0.0.1", 53)]
    found = []
    for text in resolver.nameservers:
        try:
            found.append(parse_nameserver(str(text)))
        except ValueError:
            continue  # a DNS-over-HTTPS URL and the like: not for us
    return found or [("127.0.0.1", 53)]


class Lookups:
    """The public methods, written once over `_lookup` (real and fake differ only there)."""

    def _lookup(self, name: str, rdtype: str) -> Deferred[_Answer]:
        raise NotImplementedError

    def a(self, name: str) -> Deferred[list[str]]:
        """The A records of a DNSBL name; [] when it does not exist or has none (not listed)."""
        return self._lookup(name, "A").addCallback(lambda answer: list(answer.values))

    def a_each(self, names: Sequence[str]) -> Deferred[list[list[str] | Failure]]:
        """`a` of every name at once (a DNSBL score): the A records of each, in order, or the
        Failure of its lookup (`DnsTemporaryError`); fires once the last is in, and never fails.

        Cancelling it leaves the lookups be: the cache keeps their answers.
        """
        tally = _Tally(len(names))
        for index, name in enumerate(names):
            self.a(name).addBoth(tally.settle, index)
        return tally.done

    def addresses(self, name: str) -> Deferred[list[str]]:
        """A then AAAA records; NoSuchDomain, DnsTemporaryError (only when neither answered)."""
        both = DeferredList([self._lookup(name, "A"), self._lookup(name, "AAAA")], consumeErrors=True)

        def combine(results: list[tuple[bool, Any]]) -> list[str]:
            found: list[str] = []
            problem: Failure | None = None
            for success, answer in results:
                if not success:
                    problem = answer
                elif not answer.exists:
                    raise NoSuchDomain(f"{name}: no such domain")
                else:
                    found.extend(answer.values)
            if not found and problem is not None:
                problem.raiseException()
            return found

        return both.addCallback(combine)

    def txt(self, name: str) -> Deferred[list[str]]:
        """The TXT strings of a name (each record's strings joined)."""
        return self._lookup(name, "TXT").addCallback(_existing, name)

    def ptr(self, address: str) -> Deferred[list[str]]:
        """The names an IP address's PTR records give (lower case, no trailing dot)."""
        try:
            name = reverse_name(address)
        except ValueError:
            return fail(NoSuchDomain(f"{address!r} is not an IP address"))
        return self._lookup(name, "PTR").addCallback(_existing, address)

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """[(preference, host)] sorted; [] without MX records; NullMX for a lone "."."""
        answer = self._lookup(domain, "MX").addCallback(_existing, domain)
        return answer.addCallback(lambda records: mx_answer(domain, records))


class _Tally:
    """The results of `count` lookups by their index; `done` fires with them all when the last is in.

    A count of answers still to come rather than a DeferredList: this runs for
    every new client. `done` never fails, and cancelling it leaves the lookups
    be (the cache keeps their answers).
    """

    def __init__(self, count: int) -> None:
        self.results: list[list[str] | Failure] = [[] for _ in range(count)]
        self.waiting = count
        self.done: Deferred[list[list[str] | Failure]] = Deferred()
        if not count:
            self.done.callback(self.results)

    def settle(self, result: list[str] | Failure, index: int) -> None:
        self.results[index] = result
        self.waiting -= 1
        if self.waiting == 0 and not self.done.called:
            self.done.callback(self.results)

    def answered(self, index: int, outcome: _Answer | Failure) -> None:
        self.settle(outcome if isinstance(outcome, Failure) else list(outcome.values), index)


def failure_text(failure: Failure) -> str:
    """What a failed lookup says, for a log line or an answer to a worker."""
    return failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]


def _existing(answer: _Answer, name: str) -> list[Any]:
    if not answer.exists:
        raise NoSuchDomain(f"{name}: no such domain")
    return list(answer.values)


class DnsLookups(Lookups):
    """DNS for filters over `DnsQuerier`: cached, shared, asynchronous (see the module docstring)."""

    def __init__(
        self,
        querier: DnsQuerier,
        clock: Any,
        *,
        cache_size: int = CACHE_SIZE,
        negative_ttl: float = NEGATIVE_TTL,
    ) -> None:
        self.querier = querier
        self.clock = clock
        self.cache_size = cache_size
        self.negative_ttl = negative_ttl
        self._cache: OrderedDict[tuple[str, str], tuple[float, _Answer]] = OrderedDict()
        self._in_flight: dict[tuple[str, str], list[Callable[[_Answer | Failure], object]]] = {}
        self.questions = 0  # sent to the name servers (for tests and statistics)
        self.cache_hits = 0

    @classmethod
    def from_config(cls, cfg: DnsConfig, reactor: Any) -> DnsLookups:
        servers = []
        for text in cfg.nameservers:
            try:
                servers.append(parse_nameserver(text))
            except ValueError:
                raise ConfigError(
                    "the configuration",
                    "dns.nameservers",
                    f"{text!r} is not a name server address "
                    '(write "192.0.2.53", "127.0.0.1:5353" or "[::1]:53")',
                ) from None
        querier = DnsQuerier(reactor, servers or system_nameservers(), cfg.timeout, log_problem=_log_problem)
        return cls(querier, reactor)

    def stats(self) -> dict[str, int]:
        """What `mailgatectl status` shows: questions sent, answers from the cache, and so on."""
        return {
            "questions": self.questions,
            "cache_hits": self.cache_hits,
            "cached": len(self._cache),
            "in_flight": len(self._in_flight),
        }

    def close(self) -> Deferred[Any]:
        """Fail the lookups in flight and close the sockets."""
        return self.querier.close()

    def _lookup(self, name: str, rdtype: str) -> Deferred[_Answer]:
        result: Deferred[_Answer] = Deferred()

        def notify(outcome: _Answer | Failure) -> None:
            if result.called:
                return  # cancelled by its filter's timeout
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self._ask(name, rdtype, notify)
        return result

    def a_each(self, names: Sequence[str]) -> Deferred[list[list[str] | Failure]]:
        """`Lookups.a_each` without a Deferred per name (the main process does this for every new client)."""
        tally = _Tally(len(names))
        with self.querier.together():  # the answers come back on one socket, read at once
            for index, name in enumerate(names):
                self._ask(name, "A", functools.partial(tally.answered, index))
        return tally.done

    def _ask(self, name: str, rdtype: str, notify: Callable[[_Answer | Failure], object]) -> None:
        """The answer (or the Failure) for (name, type) to `notify`: from the cache, a question in
        flight, or a new question."""
        key = (normal_name(name), rdtype)
        entry = self._cache.get(key)
        if entry is not None:
            if entry[0] > self.clock.seconds():
                self._cache.move_to_end(key)
                self.cache_hits += 1
                notify(entry[1])
                return
            del self._cache[key]
        waiting = self._in_flight.get(key)
        if waiting is not None:
            waiting.append(notify)
            return
        qname = normal_wire_name(key[0])
        if qname is None:
            notify(_NOT_FOUND)  # no DNS name can be like that
            return
        self._in_flight[key] = [notify]
        self.questions += 1
        rdtype_number = _RDTYPES.get(rdtype) or dns.rdatatype.from_text(rdtype)
        self.querier.ask(key[0], qname, rdtype_number, lambda outcome: self._settled(key, outcome))

    def _settled(self, key: tuple[str, str], outcome: Response | Exception) -> None:
        """The querier's answer or error for `key`: cache it, and tell whoever waits for it."""
        if isinstance(outcome, Exception):
            self._failed(Failure(outcome), key)  # type: ignore[no-untyped-call]
            return
        try:
            answer, ttl = interpret(outcome, key[1], self.negative_ttl)
        except Exception:
            self._failed(Failure(), key)  # type: ignore[no-untyped-call]
            return
        if ttl > 0:
            cache = self._cache
            cache[key] = (self.clock.seconds() + ttl, answer)
            cache.move_to_end(key)
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        for notify in self._in_flight.pop(key, ()):
            notify(answer)

    def _failed(self, failure: Failure, key: tuple[str, str]) -> None:
        for notify in self._in_flight.pop(key, ()):
            notify(failure)


def _log_problem(text: str) -> None:
    log.debug("dns: {problem}", problem=text)


ZoneEntry = Mapping[str, Sequence[Any]] | Exception


def _static_value(rdtype: str, value: Any) -> Any:
    """A zone dict's value in the form `_value` gives a record (names lower case, no dot)."""
    if rdtype == "PTR":
        return normal_name(str(value))
    if rdtype == "MX":
        preference, host = value
        return (int(preference), normal_name(str(host)))
    return str(value)


class StaticDnsLookups(Lookups):
    """DnsLookups answering from a dict shaped like a zone, for tests.

    ``{"example.test": {"A": ["192.0.2.1"], "MX": [(10, "mx.example.test")],
    "TXT": ["v=spf1 -all"]}, "192.0.2.1": {"PTR": ["mx.example.test"]},
    "2.0.0.127.zen.test": {"A": ["127.0.0.2"]}, "broken.test":
    DnsTemporaryError("SERVFAIL")}``. A key that is an IP address stands for
    its reverse name. A name not in the dict does not exist; a name without the
    record type has none (NODATA).

    With `hold`, each lookup waits (in `held`) until `release()`: tests of
    filters that must ask in parallel, or must not wait for each other.
    """

    def __init__(self, zone: Mapping[str, ZoneEntry], *, hold: bool = False) -> None:
        self.zone: dict[str, ZoneEntry] = {}
        for name, entry in zone.items():
            try:
                key = reverse_name(name)
            except ValueError:
                key = name
            self.zone[normal_name(key)] = entry
        self.hold = hold
        self.queries: list[tuple[str, str]] = []
        self.held: list[tuple[str, str, Deferred[_Answer]]] = []

    def _answer(self, key: str, rdtype: str) -> _Answer:
        entry = self.zone.get(key)
        if entry is None or wire_name(key) is None:
            return _NOT_FOUND
        if isinstance(entry, Exception):
            raise entry
        return _Answer(tuple(_static_value(rdtype, value) for value in entry.get(rdtype, ())))

    def _lookup(self, name: str, rdtype: str) -> Deferred[_Answer]:
        key = normal_name(name)
        self.queries.append((key, rdtype))
        if self.hold:
            deferred: Deferred[_Answer] = Deferred()
            self.held.append((key, rdtype, deferred))
            return deferred
        try:
            return succeed(self._answer(key, rdtype))
        except Exception as error:
            return fail(error)

    def release(self) -> None:
        """Answer every held lookup, in the order asked."""
        held, self.held = self.held, []
        for key, rdtype, deferred in held:
            if deferred.called:
                continue
            try:
                answer = self._answer(key, rdtype)
            except Exception as error:
                deferred.errback(error)
            else:
                deferred.callback(answer)
