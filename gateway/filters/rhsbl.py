"""RHSBL: the sender's domain (and, if asked, the HELO name) in DNS domain lists, at MAIL.

``zones`` takes the same sites as the dnsbl filter (``"dbl.example=127.0.1.[2..99]*3"``);
each checked domain is looked up as ``<domain>.<zone>`` in every zone at once and
scored alone. The first one at or over ``threshold`` gets ``action`` (reject: 554
5.7.1 "Service unavailable; sender domain [example.com] blocked using zone"; defer;
or tag with an X-Mailgate-Rhsbl header). With a negative ``whitelist_threshold``, a
sender domain scoring at or under it accepts the stage (a domain allow list). The
null sender has no domain to check. A zone that fails or times out counts as not
listing the domain.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._dnslists import DnsLists, Score, Site, read_sites, read_thresholds
from gateway.filters.dns import Lookups
from gateway.filters.dnsbl import ACTIONS, listed_verdict
from gateway.filters.helo import hostname_problem
from gateway.filters.sender_domain import domain_of
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, Stage, Verdict

log = Logger(namespace="mailgate.filter")

HEADER = "X-Mailgate-Rhsbl"


@implementer(IFilter)
class Rhsbl:
    """Sender (and HELO) domains in DNS block and allow lists (see the module docstring)."""

    name = "rhsbl"
    stages = frozenset({Stage.MAIL})

    def __init__(
        self,
        sites: tuple[Site, ...],
        dns: Lookups,
        *,
        threshold: int = 1,
        whitelist_threshold: int = 0,
        action: str = "reject",
        txt: bool = True,
        check_sender: bool = True,
        check_helo: bool = False,
    ) -> None:
        self.sites = sites
        self.lists = DnsLists(sites, dns, log, txt=txt, owner=self)
        self.threshold = threshold
        self.whitelist_threshold = whitelist_threshold
        self.action = action
        self.check_sender = check_sender
        self.check_helo = check_helo

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Rhsbl:
        sites = read_sites(options, services)
        threshold, whitelist_threshold = read_thresholds(options)
        action = options.choice("action", ACTIONS, "reject")
        txt = options.take("txt", bool, True)
        check_sender = options.take("check_sender", bool, True)
        check_helo = options.take("check_helo", bool, False)
        if not (check_sender or check_helo):
            raise options.error(
                "check_sender", "nothing to check: check_sender and check_helo are both false"
            )
        return cls(
            sites,
            services.dns,
            threshold=threshold,
            whitelist_threshold=whitelist_threshold,
            action=action,
            txt=txt,
            check_sender=check_sender,
            check_helo=check_helo,
        )

    def _domains(self, request: Request) -> list[tuple[str, str]]:
        """(what the reply calls it, domain) for each domain to look up."""
        domains = []
        if self.check_sender and request.envelope is not None:
            sender = domain_of(request.envelope.mail_from)
            if sender is not None:
                domains.append(("sender domain", sender))
        helo = (request.session.helo or "").rstrip(".").lower()
        if self.check_helo and helo and hostname_problem(helo) is None:
            domains.append(("HELO name", helo))
        return domains

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        domains = self._domains(request)
        if not domains:
            return CONTINUE
        scores = [self.lists.score(domain, threshold=self.threshold) for _, domain in domains]
        return gatherResults(scores).addCallback(self._verdict, domains)

    def _verdict(self, scores: list[Score], domains: list[tuple[str, str]]) -> Verdict:
        for (kind, domain), score in zip(domains, scores, strict=True):
            verdict = listed_verdict(
                score,
                threshold=self.threshold,
                whitelist_threshold=self.whitelist_threshold if kind == "sender domain" else 0,
                action=self.action,
                blocked=f"{kind} [{domain}]",
                header=HEADER,
            )
            if verdict is not None:
                return verdict
        return CONTINUE
