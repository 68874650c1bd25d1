"""The sender's domain must exist and take mail: MX, or failing that A/AAAA (RFC 5321 implicit MX).

At MAIL, as Postfix's reject_unknown_sender_domain: a domain that does not
exist (NXDOMAIN), or exists with neither MX nor address, is refused with
``550 5.1.8 <sender>: Sender address rejected: Domain not found``
(``reject_code = 450`` makes it temporary); a null MX (RFC 7505, the domain
says it sends no mail and takes none) with ``550 5.7.27``. A temporary DNS
failure is ``450 4.1.8`` (or, with ``on_dns_failure = "continue"``, no
opinion): never a 5xx. The null sender <> and address literals pass.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.delivery.resolver import NullMX
from gateway.filters import FilterServices, Request
from gateway.filters._dnscheck import dns_failure, lookup_failed, refusal, reply_code
from gateway.filters.dns import Lookups
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, Stage, Verdict


def domain_of(address: str) -> str | None:
    """The domain of an address, lower case; None for <>, no domain, or an address literal."""
    local, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not local or not domain or domain.startswith("["):
        return None
    return domain


@implementer(IFilter)
class SenderDomain:
    """Refuses senders whose domain cannot receive mail (see the module docstring)."""

    name = "sender-domain"
    stages = frozenset({Stage.MAIL})

    def __init__(self, dns: Lookups, *, reject_code: int = 550, on_dns_failure: str = "defer") -> None:
        self.dns = dns
        self.reject_code = reject_code
        self.on_dns_failure = on_dns_failure

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> SenderDomain:
        reject_code = reply_code(options, "reject_code", 550)
        on_dns_failure = options.choice("on_dns_failure", ("defer", "continue"), "defer")
        return cls(services.dns, reject_code=reject_code, on_dns_failure=on_dns_failure)

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        sender = request.envelope.mail_from if request.envelope is not None else ""
        domain = domain_of(sender)
        if domain is None:
            return CONTINUE
        return self.dns.mx(domain).addCallbacks(
            self._has_mx, self._no_mx, callbackArgs=(sender, domain), errbackArgs=(sender, domain)
        )

    def _has_mx(self, hosts: list[tuple[int, str]], sender: str, domain: str) -> Verdict | Deferred[Verdict]:
        if hosts:
            return CONTINUE
        # no MX: the domain's own address is its mail server (RFC 5321 5.1)
        return self.dns.addresses(domain).addCallbacks(
            self._has_addresses, self._failed, callbackArgs=(sender,), errbackArgs=(sender,)
        )

    def _no_mx(self, failure: Failure, sender: str, domain: str) -> Verdict | Failure:
        if isinstance(failure.value, NullMX):
            return Verdict.reject(
                f"<{sender}>: Sender address rejected: Domain {domain} accepts no mail (null MX)",
                550,
                "5.7.27",
            )
        return self._failed(failure, sender)

    def _has_addresses(self, addresses: list[str], sender: str) -> Verdict:
        return CONTINUE if addresses else self._not_found(sender)

    def _failed(self, failure: Failure, sender: str) -> Verdict | Failure:
        return lookup_failed(failure, lambda: self._not_found(sender), lambda: self._dns_failure(sender))

    def _dns_failure(self, sender: str) -> Verdict:
        reason = f"<{sender}>: Sender address rejected: Domain not found, try again later"
        return dns_failure(self.on_dns_failure, reason, "4.1.8")

    def _not_found(self, sender: str) -> Verdict:
        return refusal(f"<{sender}>: Sender address rejected: Domain not found", self.reject_code, "1.8")
