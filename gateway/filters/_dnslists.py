"""DNS lists with weights, as Postfix's postscreen_dnsbl_sites writes them; shared by dnsbl and rhsbl.

A site is ``zone[=filter][*weight]``:

- ``zen.spamhaus.org``: any answer in 127.0.0.0/8 counts, weight 1 (answers in
  127.255.255.0/24 are the lists' error codes, "you may not query us", and never count);
- ``zen.spamhaus.org=127.0.0.[2..11]*3``: only answers the filter matches count,
  each octet a number or a bracketed list of numbers and ranges (``[2;4..7]``);
- ``list.dnswl.org=127.0.[0..255].[1..3]*-2``: a negative weight is an allow list.

A name (a reversed client IP, a domain) is looked up in every zone at once, each
zone once however many sites name it. A site whose zone answers with an address
its filter matches adds its weight to the score. A zone whose lookup fails or
times out counts as not listing the name; that is logged, never a rejection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import Section
from gateway.filters.dns import Lookups, failure_text

_OCTET = r"(?:\d{1,3}|\[[0-9.;]+\])"
_FILTER = re.compile(rf"^({_OCTET})\.({_OCTET})\.({_OCTET})\.({_OCTET})$")
_SITE = re.compile(r"^(?P<zone>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>[+-]?\d+))?$")
_ZONE = re.compile(r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{2,63}$")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@attrs.frozen
class Site:
    """One entry of a zones list: a zone, which answers count, and their weight."""

    zone: str
    weight: int = 1
    octets: tuple[frozenset[int], ...] | None = None  # None: any 127/8 answer but the error codes
    text: str = ""

    def matches(self, answer: str) -> bool:
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.octets is None:
            return address in _LOOPBACK and address not in _ERROR_CODES
        return all(octet in allowed for octet, allowed in zip(address.packed, self.octets, strict=True))


def parse_site(text: str) -> Site:
    """A Site from ``zone[=filter][*weight]``; ValueError naming the problem."""
    match = _SITE.match(text.strip())
    if match is None:
        raise ValueError(f'{text!r} is not "zone", "zone=127.0.0.[2..11]" or "zone=...*weight"')
    zone = match["zone"].rstrip(".").lower()
    if not _ZONE.match(zone):
        raise ValueError(f"{text!r}: {zone!r} is not a DNS zone name")
    octets = _parse_filter(text, match["filter"]) if match["filter"] else None
    weight = int(match["weight"]) if match["weight"] else 1
    return Site(zone, weight, octets, text.strip())


def _parse_filter(text: str, pattern: str) -> tuple[frozenset[int], ...]:
    found = _FILTER.match(pattern)
    if found is None:
        raise ValueError(f"{text!r}: the filter {pattern!r} is not like 127.0.0.2 or 127.0.0.[2..11]")
    octets = []
    for part in found.groups():
        values: set[int] = set()
        items = part[1:-1].split(";") if part.startswith("[") else [part]
        for item in items:
            low, dots, high = item.partition("..")
            if not low.isdigit() or (dots and not high.isdigit()) or (not dots and "." in item):
                raise ValueError(f"{text!r}: {item!r} in {pattern!r} is not a number or a range a..b")
            first, last = int(low), int(high) if dots else int(low)
            if not 0 <= first <= last <= 255:
                raise ValueError(f"{text!r}: {item!r} in {pattern!r} is not within 0..255")
            values.update(range(first, last + 1))
        octets.append(frozenset(values))
    return tuple(octets)


def read_sites(options: Section, services: Any, key: str = "zones") -> tuple[Site, ...]:
    """The zones option: each site well formed, and at least one if a chain uses the filter.

    A table no chain uses (the documented example, a filter switched off) may
    leave the zones empty: the registry only checks its keys.
    """
    texts = options.strings(key, ())
    if not texts and _in_a_chain(options, services):
        raise options.error(key, 'no zones: list at least one, like ["zen.spamhaus.org=127.0.0.[2..11]*3"]')
    sites = []
    for text in texts:
        try:
            sites.append(parse_site(text))
        except ValueError as error:
            raise options.error(key, str(error)) from None
    return tuple(sites)


def _in_a_chain(options: Section, services: Any) -> bool:
    name = options.path.removeprefix("filters.")
    chains = services.config.filters
    return any(name in getattr(chains, direction) for direction in ("inbound", "outbound", "fetched"))


def read_thresholds(options: Section) -> tuple[int, int]:
    """threshold (default 1, at least 1) and whitelist_threshold (default 0 = off, else negative)."""
    threshold = options.take("threshold", int, 1)
    if threshold < 1:
        raise options.error(
            "threshold", f"must be at least 1 (a score of 0 is every unlisted client), not {threshold}"
        )
    whitelist = options.take("whitelist_threshold", int, 0)
    if whitelist > 0:
        raise options.error("whitelist_threshold", f"must be 0 (off) or negative, not {whitelist}")
    return threshold, whitelist


@attrs.frozen
class Listing:
    """A site that listed the name, with the answers that matched its filter."""

    site: Site
    answers: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.site.zone}={','.join(self.answers)}*{self.site.weight}"


@attrs.define
class Score:
    """What the zones said about one name.

    Not frozen, though nobody changes one: one is made for every new client, and
    a frozen attrs class takes three times as long to make.
    """

    name: str  # what was looked up ("2.0.0.127", "example.com")
    score: int = 0
    listings: tuple[Listing, ...] = ()  # in the order of the config
    failed: tuple[str, ...] = ()  # zones that did not answer
    reason: str = ""  # the TXT of the first blocking zone, when asked for

    @property
    def blocking(self) -> tuple[Listing, ...]:
        """Listings with a positive weight, heaviest first."""
        positive = [listing for listing in self.listings if listing.site.weight > 0]
        return tuple(sorted(positive, key=lambda listing: -listing.site.weight))

    @property
    def allowing(self) -> tuple[Listing, ...]:
        return tuple(listing for listing in self.listings if listing.site.weight < 0)

    def zones(self, listings: Sequence[Listing]) -> str:
        return ", ".join(dict.fromkeys(listing.site.zone for listing in listings))

    def header(self) -> str:
        listed = ", ".join(listing.describe() for listing in self.listings)
        return f"score={self.score}; {listed}" if listed else f"score={self.score}"


class DnsLists:
    """Looks a name up in every zone of some sites at once and scores the answers."""

    def __init__(self, sites: Sequence[Site], dns: Lookups, log: Logger, *, txt: bool, owner: Any) -> None:
        self.sites = tuple(sites)
        self.zones = tuple(dict.fromkeys(site.zone for site in sites))
        self.dns = dns
        self.log = log
        self.txt = txt
        self.owner = owner  # the filter, whose (instance) name the log lines carry

    def score(
        self,
        name: str,
        *,
        threshold: int | None = None,
        then: Callable[..., Any] | None = None,
        then_args: tuple[Any, ...] = (),
        unlisted: Any = None,
    ) -> Deferred[Any]:
        """The Score of `name` (a reversed IP or a domain); never fails.

        With `threshold`, the TXT reason is asked for only when the score reaches it.
        With `then`, the result is ``then(score, *then_args)`` instead, called in the
        same callback (one Deferred callback less for every new client). With
        `unlisted` too, that is the result when every zone answered and none lists
        `name` (what `then` gives for an empty Score, the usual answer), and no
        Score is made.
        """
        return self.dns.a_each([f"{name}.{zone}" for zone in self.zones]).addCallback(
            self._scored, name, threshold, then, then_args, unlisted
        )

    def prefetch(self, name: str) -> None:
        """Ask every zone about `name` now, for `score` to find the answers cached or under way."""
        self.dns.a_each([f"{name}.{zone}" for zone in self.zones]).addErrback(self._prefetch_failed, name)

    def _prefetch_failed(self, failure: Failure, name: str) -> None:
        self.log.failure(
            "filter: {filter}: early lookup of {name} failed", failure, filter=self.owner.name, name=name
        )

    def _scored(
        self,
        results: list[list[str] | Failure],
        name: str,
        threshold: int | None = None,
        then: Callable[..., Any] | None = None,
        then_args: tuple[Any, ...] = (),
        unlisted: Any = None,
    ) -> Any:
        if unlisted is not None and not any(results):  # (a Failure is true)
            return unlisted
        scored = self._score(results, name)
        score = self._reason(scored, threshold) if self.txt else scored
        if then is None:
            return score
        if isinstance(score, Deferred):
            return score.addCallback(then, *then_args)
        return then(score, *then_args)

    def _score(self, results: list[list[str] | Failure], name: str) -> Score:
        if not any(results):  # listed nowhere, and every zone answered (a Failure is true)
            return Score(name)
        answers: dict[str, list[str]] = {}
        failed = []
        for zone, result in zip(self.zones, results, strict=True):
            if not isinstance(result, Failure):
                answers[zone] = result
                errors = [a for a in result if _is_error_code(a)]
                if errors:
                    self.log.warn(
                        "filter: {filter}: {zone} answered {answer} for {name}: an error code, not a listing "
                        "(the list refuses queries from this resolver; see its usage terms)",
                        filter=self.owner.name,
                        zone=zone,
                        answer=errors[0],
                        name=name,
                    )
            else:
                failed.append(zone)
                self.log.warn(
                    "filter: {filter}: lookup of {name} in {zone} failed ({error}); counted as not listed",
                    filter=self.owner.name,
                    name=name,
                    zone=zone,
                    error=failure_text(result),
                )
        listings = []
        for site in self.sites:
            matched = tuple(a for a in answers.get(site.zone, ()) if site.matches(a))
            if matched:
                listings.append(Listing(site, matched))
        total = sum(listing.site.weight for listing in listings)
        return Score(name, total, tuple(listings), tuple(failed))

    def _reason(self, score: Score, threshold: int | None) -> Deferred[Score] | Score:
        if not score.listings:
            return score  # listed nowhere, the usual answer
        blocking = score.blocking
        if not blocking or (threshold is not None and score.score < threshold):
            return score
        asked: Deferred[list[str]] = self.dns.txt(f"{score.name}.{blocking[0].site.zone}")

        def found(texts: list[str]) -> Score:
            return attrs.evolve(score, reason=_one_line(" ".join(texts)))

        def missing(failure: Failure) -> Score:
            return score  # a listing without TXT, or a TXT that timed out: the reply goes without

        return asked.addCallbacks(found, missing)


def _is_error_code(answer: str) -> bool:
    try:
        return ipaddress.IPv4Address(answer) in _ERROR_CODES
    except ValueError:
        return False


def _one_line(text: str, limit: int = 200) -> str:
    """A TXT fit for an SMTP reply: printable ASCII, one line, not too long."""
    clean = "".join(c if " " <= c <= "~" else " " for c in text)
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
