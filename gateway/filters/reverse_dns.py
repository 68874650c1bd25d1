"""Forward-confirmed reverse DNS of the client, at CONNECT.

The client's address must have PTR names, and one of them (the first five) must
resolve back to the address. Two outcomes are configurable:

- ``no_ptr``: no PTR record at all (Postfix's reject_unknown_reverse_client_hostname);
- ``not_confirmed``: PTR names, none resolving back (reject_unknown_client_hostname).

Each is "reject" (``reject_code`` 450, the default, as Postfix: the sender retries
and the mail is not lost if the DNS is fixed; or 550), "tag" (an
X-Mailgate-Reverse-Dns header and a score for the content filters), or
"continue". A rejection at CONNECT takes the place of the banner; a 450 there is
sent as 421. A DNS failure is no opinion or, with ``on_dns_failure = "defer"``, a
421: never a 5xx. Both default to "tag": many small but real mail servers lack a
matching PTR, and a tag loses no mail. While a filter before this one keeps the
client waiting (a greet wait, the DNSBLs), the lookups start already (`IPrepare`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.delivery.resolver import DnsTemporaryError, NoSuchDomain
from gateway.filters import FilterServices, Request
from gateway.filters._dnscheck import client_address, dns_failure, lookup_failed, refusal, reply_code
from gateway.filters.dns import Lookups
from gateway.interfaces import IFilter, IPrepare
from gateway.model import CONTINUE, Action, Stage, Verdict

HEADER = "X-Mailgate-Reverse-Dns"
OUTCOMES = ("reject", "tag", "continue")
MAX_NAMES = 5  # PTR names followed forward, as a bound on the work one client can cause


def _same(found: list[str], client: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    for text in found:
        try:
            if ipaddress.ip_address(text) == client:
                return True
        except ValueError:
            continue
    return False


def _checked_names(names: list[str]) -> list[str]:
    """The PTR names whose addresses are looked up: each once, the first MAX_NAMES."""
    return [name for name in dict.fromkeys(names) if name][:MAX_NAMES]


def _judged_later(failure: Failure) -> None:
    """An early lookup that failed: check() asks again and judges it (no PTR, DNS trouble)."""


@implementer(IFilter, IPrepare)
class ReverseDns:
    """The client's PTR must resolve back to it (see the module docstring)."""

    name = "reverse-dns"
    stages = frozenset({Stage.CONNECT})

    def __init__(
        self,
        dns: Lookups,
        *,
        no_ptr: str = "tag",
        not_confirmed: str = "tag",
        no_ptr_score: float = 1.0,
        not_confirmed_score: float = 0.5,
        reject_code: int = 450,
        on_dns_failure: str = "continue",
    ) -> None:
        self.dns = dns
        self.no_ptr = no_ptr
        self.not_confirmed = not_confirmed
        self.no_ptr_score = no_ptr_score
        self.not_confirmed_score = not_confirmed_score
        self.reject_code = reject_code
        self.on_dns_failure = on_dns_failure

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> ReverseDns:
        return cls(
            services.dns,
            no_ptr=options.choice("no_ptr", OUTCOMES, "tag"),
            not_confirmed=options.choice("not_confirmed", OUTCOMES, "tag"),
            no_ptr_score=options.take("no_ptr_score", float, 1.0),
            not_confirmed_score=options.take("not_confirmed_score", float, 0.5),
            reject_code=reply_code(options, "reject_code", 450),
            on_dns_failure=options.choice("on_dns_failure", ("continue", "defer"), "continue"),
        )

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        client = client_address(request.session.peer_host)
        if client is None:
            return CONTINUE
        return self.dns.ptr(str(client)).addCallbacks(
            self._names, self._ptr_failed, callbackArgs=(client,), errbackArgs=(client,)
        )

    def prepare(self, request: Request) -> None:
        """Look the PTR and its names up now (while the stage waits); check() finds them cached."""
        client = client_address(request.session.peer_host)
        if client is not None:
            self.dns.ptr(str(client)).addCallback(self._prefetch_names).addErrback(_judged_later)

    def _prefetch_names(self, names: list[str]) -> None:
        for name in _checked_names(names):
            self.dns.addresses(name).addErrback(_judged_later)

    def _ptr_failed(self, failure: Failure, client: Any) -> Verdict | Failure:
        return lookup_failed(failure, lambda: self._no_ptr(client), lambda: self._dns_failure(client))

    def _names(self, names: list[str], client: Any) -> Verdict | Deferred[Verdict]:
        names = _checked_names(names)
        if not names:
            return self._no_ptr(client)
        lookups = DeferredList([self.dns.addresses(name) for name in names], consumeErrors=True)
        return lookups.addCallback(self._forward, names, client)

    def _forward(self, results: list[tuple[bool, Any]], names: list[str], client: Any) -> Verdict:
        temporary = False
        for success, result in results:
            if success and _same(result, client):
                return CONTINUE
            if not success and not isinstance(result.value, NoSuchDomain):
                if not isinstance(result.value, DnsTemporaryError):
                    result.raiseException()  # a bug: the runner's failure verdict
                temporary = True
        if temporary:
            return self._dns_failure(client)
        return self._outcome(
            self.not_confirmed,
            self.not_confirmed_score,
            f"Client host rejected: cannot find your hostname, [{client}]",
            f"client [{client}]: reverse DNS {names[0]} does not resolve back to it",
            f"not-confirmed ptr={names[0]}",
        )

    def _no_ptr(self, client: Any) -> Verdict:
        return self._outcome(
            self.no_ptr,
            self.no_ptr_score,
            f"Client host rejected: cannot find your reverse hostname, [{client}]",
            f"client [{client}] has no reverse DNS (PTR)",
            "none",
        )

    def _outcome(self, choice: str, score: float, refused: str, note: str, header: str) -> Verdict:
        if choice == "continue":
            return CONTINUE
        if choice == "tag":
            return Verdict(Action.TAG, note, score, headers=((HEADER, header),))
        return refusal(refused, self.reject_code, "7.1")

    def _dns_failure(self, client: Any) -> Verdict:
        reason = f"Client host rejected: cannot find your hostname, [{client}]; try again later"
        return dns_failure(self.on_dns_failure, reason)
