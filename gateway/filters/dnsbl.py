"""DNSBL and DNSWL lookups of the client's address, scored the way Postfix's postscreen does.

``zones`` lists sites in postscreen_dnsbl_sites syntax (see `gateway.filters._dnslists`):
``"zen.spamhaus.org=127.0.0.[2..11]*3"``, ``"list.dnswl.org=127.0.[0..255].[1..3]*-2"``.
All zones are asked at once; the weights of the sites that list the client add up to
its score. A score at or over ``threshold`` (default 1) gets ``action``: reject (554
5.7.1 "Service unavailable; client [ip] blocked using zone", the list's TXT after it
when ``txt``), defer (4xx), or tag (an X-Mailgate-Dnsbl header and the score, for the
content filters to weigh). A score at or under a negative ``whitelist_threshold``
accepts the stage, skipping the filters after this one (greylisting, say).

``stage`` is "connect" (before the banner, as postscreen) or "rcpt" (the log then
shows sender and recipient; answers are cached, so a second recipient costs nothing).
When a filter before this one makes the stage wait (the protocol filter's greet
wait), the lookups start then, as postscreen's do, not after it (`IPrepare`).
A zone that fails or times out counts as not listing the client: DNS trouble never
turns into a 5xx.
"""

from __future__ import annotations

import ipaddress
import socket

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._dnslists import DnsLists, Score, Site, read_sites, read_thresholds
from gateway.filters.dns import Lookups
from gateway.interfaces import IFilter, IPrepare
from gateway.model import CONTINUE, Action, Stage, Verdict

log = Logger(namespace="mailgate.filter")

ACTIONS = ("reject", "defer", "tag")
STAGES = {"connect": Stage.CONNECT, "rcpt": Stage.RCPT}
HEADER = "X-Mailgate-Dnsbl"


def reversed_address(text: str) -> str | None:
    """The DNSBL form of an IP address: "2.0.0.127" for 127.0.0.2, nibbles for IPv6; None if no IP."""
    try:
        octets = socket.inet_pton(socket.AF_INET, text)  # the usual client, without ipaddress's cost
    except OSError:
        pass
    else:
        return f"{octets[3]}.{octets[2]}.{octets[1]}.{octets[0]}"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 client on a dual-stack listener
    pointer = address.reverse_pointer
    return pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")


def listed_verdict(
    score: Score,
    *,
    threshold: int,
    whitelist_threshold: int,
    action: str,
    blocked: str,
    header: str,
) -> Verdict | None:
    """The verdict for a score, or None when it is neither blocked nor allowed.

    `blocked` names what was looked up, as the reply says it ("client [192.0.2.1]").
    """
    if score.score >= threshold:
        zones = score.zones(score.blocking)
        reason = f"Service unavailable; {blocked} blocked using {zones}"
        if score.reason:
            reason += f"; {score.reason}"
        if action == "tag":
            return Verdict(
                Action.TAG, f"{blocked} listed by {zones}", score.score, headers=((header, score.header()),)
            )
        if action == "defer":
            return Verdict(Action.DEFER, reason, score.score, code=450, enhanced="4.7.1")
        return Verdict(Action.REJECT, reason, score.score, code=554, enhanced="5.7.1")
    if whitelist_threshold < 0 and score.score <= whitelist_threshold:
        zones = score.zones(score.allowing)
        return Verdict(Action.ACCEPT, f"{blocked} allowed by {zones} (score {score.score})", score.score)
    return None


@implementer(IFilter, IPrepare)
class Dnsbl:
    """The client's address in DNS block and allow lists (see the module docstring)."""

    name = "dnsbl"
    stages = frozenset({Stage.CONNECT})

    def __init__(
        self,
        sites: tuple[Site, ...],
        dns: Lookups,
        *,
        threshold: int = 1,
        whitelist_threshold: int = 0,
        action: str = "reject",
        stage: Stage = Stage.CONNECT,
        txt: bool = True,
    ) -> None:
        self.sites = sites
        self.lists = DnsLists(sites, dns, log, txt=txt, owner=self)
        self.threshold = threshold
        self.whitelist_threshold = whitelist_threshold
        self.action = action
        self.stages = frozenset({stage})
        # what a client no zone lists gets: CONTINUE, unless the thresholds say otherwise
        unlisted_continues = (
            listed_verdict(
                Score(""),
                threshold=threshold,
                whitelist_threshold=whitelist_threshold,
                action=action,
                blocked="",
                header=HEADER,
            )
            is None
        )
        self._unlisted: Verdict | None = CONTINUE if unlisted_continues else None

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Dnsbl:
        sites = read_sites(options, services)
        threshold, whitelist_threshold = read_thresholds(options)
        action = options.choice("action", ACTIONS, "reject")
        stage = STAGES[options.choice("stage", tuple(STAGES), "connect")]
        txt = options.take("txt", bool, True)
        return cls(
            sites,
            services.dns,
            threshold=threshold,
            whitelist_threshold=whitelist_threshold,
            action=action,
            stage=stage,
            txt=txt,
        )

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        client = request.session.peer_host
        name = reversed_address(client)
        if name is None:
            return CONTINUE  # not an IP client (a test harness, a UNIX socket)
        return self.lists.score(
            name, threshold=self.threshold, then=self._verdict, then_args=(client,), unlisted=self._unlisted
        )

    def prepare(self, request: Request) -> None:
        name = reversed_address(request.session.peer_host)
        if name is not None:
            self.lists.prefetch(name)

    def _verdict(self, score: Score, client: str) -> Verdict:
        if not score.listings and self._unlisted is not None:
            return CONTINUE  # a zone failed, none lists the client: without the work below
        verdict = listed_verdict(
            score,
            threshold=self.threshold,
            whitelist_threshold=self.whitelist_threshold,
            action=self.action,
            blocked=f"client [{client}]",
            header=HEADER,
        )
        if verdict is not None:
            return verdict
        if score.listings:
            log.info(
                "filter: {name}: client [{client}] listed by {listed}: "
                "score {score} under threshold {threshold}",
                name=self.name,
                client=client,
                listed=", ".join(listing.describe() for listing in score.listings),
                score=score.score,
                threshold=self.threshold,
            )
        return CONTINUE
