"""SMTP transports: fixed hosts with failover, MX delivery, and the smart-host relay.

All of them leave the conversation to `Dialer` (sessions, connection cache, TLS)
and only decide which servers to try, in which order:

- `SmtpTransport` ("smtp:[host]:port, smtp:[host2]:port"): the hosts in order;
  a host written without brackets gets an MX lookup (Postfix's rule);
- `MxTransport` ("mx"): the recipient domain's MX hosts by preference (equal
  preferences shuffled), their addresses, at most `max_addresses` tries;
- `RelayTransport`: the upstream smart host never / on-failure / always, around
  a direct transport.

A recipient with a transient answer from one server (or none, because the
connection failed) is offered to the next; the last answer is the result.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence

from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from gateway.delivery.connections import Dialer, Target, deliver_in_turn
from gateway.delivery.resolver import DnsTemporaryError, NoSuchDomain, NullMX
from gateway.delivery.router import HostPort, TransportSpec, parse_transport
from gateway.interfaces import IResolver, ITransport
from gateway.model import Delivery, Recipient, RecipientResult
from gateway.smtp.client import AuthCredentials, Outcome, TlsPolicy


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _finish(
    recipients: Sequence[Recipient], results: dict[int, Outcome], fallback: RecipientResult | None
) -> list[RecipientResult]:
    out = []
    for i, recipient in enumerate(recipients):
        if i in results:
            out.append(results[i].result)
        else:
            assert fallback is not None
            out.append(
                RecipientResult(recipient, fallback.code, fallback.enhanced, fallback.text, fallback.relay)
            )
    return out


def _dns_failure(recipient: Recipient, error: Exception, what: str) -> RecipientResult:
    """A recipient result for a DNS failure, in Postfix's words."""
    if isinstance(error, NullMX):
        return RecipientResult(
            recipient, 556, "5.1.10", f"Domain {what} does not accept mail (nullMX)", "none"
        )
    if isinstance(error, NoSuchDomain):
        return RecipientResult(recipient, 550, "5.1.2", f"Host or domain name not found. {error}", "none")
    return RecipientResult(recipient, 451, "4.4.3", f"Host or domain name not found. {error}", "none")


class _Targets:
    """Turns hosts into `Target`s through DNS, keeping the first DNS failure as the reason."""

    def __init__(self, resolver: IResolver, limit: int) -> None:
        self.resolver = resolver
        self.limit = limit
        self.error: Exception | None = None
        self.error_name = ""

    async def addresses(self, host: str) -> list[str]:
        if is_ip_address(host):
            return [host]
        try:
            found: list[str] = await self.resolver.lookup_addresses(host)
        except (NoSuchDomain, DnsTemporaryError) as error:
            # a temporary failure is the better reason: it does not bounce
            if self.error is None or isinstance(error, DnsTemporaryError):
                self.error, self.error_name = error, host
            return []
        return found

    async def mx_hosts(self, domain: str) -> list[str]:
        """MX hosts in order (equal preferences shuffled); the domain itself if no MX."""
        records: list[tuple[int, str]] = await self.resolver.lookup_mx(domain)
        if not records:
            return [domain]  # implicit MX (RFC 5321 5.1)
        shuffled = [(preference, random.random(), host) for preference, host in records]
        return [host for _preference, _key, host in sorted(shuffled)]


@implementer(ITransport)
class MxTransport:
    """Delivery to the recipient domain's MX hosts."""

    def __init__(
        self,
        dialer: Dialer,
        resolver: IResolver,
        *,
        tls: TlsPolicy = TlsPolicy.MAY,
        port: int = 25,
        max_addresses: int = 5,
        name: str = "mx",
    ) -> None:
        self.dialer = dialer
        self.resolver = resolver
        self.tls = tls
        self.port = port
        self.max_addresses = max_addresses
        self.name = name

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        return ensureDeferred(self._deliver(delivery))

    async def _deliver(self, delivery: Delivery) -> list[RecipientResult]:
        by_domain: dict[str, list[int]] = {}
        for i, recipient in enumerate(delivery.recipients):
            by_domain.setdefault(recipient.address.rpartition("@")[2].lower(), []).append(i)
        results: list[RecipientResult | None] = [None] * len(delivery.recipients)
        for domain, indexes in by_domain.items():
            recipients = [delivery.recipients[i] for i in indexes]
            for i, result in zip(
                indexes, await self.deliver_domain(domain, delivery, recipients), strict=True
            ):
                results[i] = result
        return [r for r in results if r is not None]

    async def deliver_domain(
        self, domain: str, delivery: Delivery, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        targets = _Targets(self.resolver, self.max_addresses)
        try:
            hosts = await targets.mx_hosts(domain)
        except (NullMX, NoSuchDomain, DnsTemporaryError) as error:
            return [_dns_failure(r, error, domain) for r in recipients]
        results: dict[int, Outcome] = {}
        tried = 0
        for host in hosts:
            if tried >= self.max_addresses:
                break
            addresses = await targets.addresses(host)
            chosen = [
                Target(host, address, self.port, self.tls)
                for address in addresses[: self.max_addresses - tried]
            ]
            tried += len(chosen)
            await deliver_in_turn(self.dialer, chosen, delivery, recipients, results)
            if all(not outcome.failover for outcome in results.values()) and len(results) == len(recipients):
                break
        fallback = None
        if len(results) < len(recipients):
            reason = targets.error or DnsTemporaryError(f"no address found for the MX hosts of {domain}")
            fallback = _dns_failure(recipients[0], reason, domain)
        return _finish(recipients, results, fallback)


@implementer(ITransport)
class SmtpTransport:
    """Delivery to fixed hosts, in order: "smtp:[host]:port, smtp:[host2]:port"."""

    def __init__(
        self,
        spec: str | TransportSpec,
        dialer: Dialer,
        resolver: IResolver,
        *,
        tls: TlsPolicy = TlsPolicy.MAY,
        credentials: AuthCredentials | None = None,
        lmtp: bool = False,
        max_addresses: int = 10,
    ) -> None:
        self.spec = parse_transport(spec) if isinstance(spec, str) else spec
        self.name = self.spec.text
        self.dialer = dialer
        self.resolver = resolver
        self.tls = tls
        self.credentials = credentials
        self.lmtp = lmtp
        self.max_addresses = max_addresses

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        return ensureDeferred(self._deliver(delivery))

    def _target(self, host: str, address: str, port: int) -> Target:
        return Target(host, address, port, self.tls, self.credentials, lmtp=self.lmtp)

    async def _deliver(self, delivery: Delivery) -> list[RecipientResult]:
        recipients = delivery.recipients
        targets = _Targets(self.resolver, self.max_addresses)
        results: dict[int, Outcome] = {}
        tried = 0
        for hostport in self.spec.hosts:
            if tried >= self.max_addresses:
                break
            for host in await self._hosts(hostport, targets):
                chosen = [self._target(host, a, hostport.port) for a in await targets.addresses(host)]
                chosen = chosen[: self.max_addresses - tried]
                tried += len(chosen)
                await deliver_in_turn(self.dialer, chosen, delivery, recipients, results)
                if len(results) == len(recipients) and not any(o.failover for o in results.values()):
                    return _finish(recipients, results, None)
        fallback = None
        if len(results) < len(recipients):
            error = targets.error or DnsTemporaryError(f"no address found for {self.name}")
            fallback = _dns_failure(recipients[0], error, self.name)
        return _finish(recipients, results, fallback)

    async def _hosts(self, hostport: HostPort, targets: _Targets) -> list[str]:
        if not hostport.mx_lookup or is_ip_address(hostport.host):
            return [hostport.host]
        try:
            return await targets.mx_hosts(hostport.host)
        except (NullMX, NoSuchDomain, DnsTemporaryError) as error:
            targets.error, targets.error_name = error, hostport.host
            return []


RELAY_MODES = ("never", "on-failure", "always")


@implementer(ITransport)
class RelayTransport:
    """The upstream smart host around direct delivery.

    ``never``: direct only; ``always``: the upstream only; ``on-failure``: direct
    first, then the upstream for every recipient that got a transient failure
    (connection refused, timeouts, 4xx); permanent failures stand.
    """

    def __init__(self, direct: ITransport, upstream: ITransport, mode: str = "on-failure") -> None:
        if mode not in RELAY_MODES:
            raise ValueError(f"relay mode {mode!r}: use one of {', '.join(RELAY_MODES)}")
        self.direct = direct
        self.upstream = upstream
        self.mode = mode
        self.name = {"never": direct.name, "always": upstream.name}.get(
            mode, f"{direct.name} (on failure: {upstream.name})"
        )

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        if self.mode == "never":
            return self.direct.deliver(delivery)
        if self.mode == "always":
            return self.upstream.deliver(delivery)
        return ensureDeferred(self._on_failure(delivery))

    async def _on_failure(self, delivery: Delivery) -> list[RecipientResult]:
        results: list[RecipientResult] = await self.direct.deliver(delivery)
        retry = [i for i, r in enumerate(results) if not r.delivered and not r.permanent]
        if not retry:
            return results
        again = Delivery(
            queue_id=delivery.queue_id,
            envelope=delivery.envelope,
            recipients=tuple(delivery.recipients[i] for i in retry),
            message_path=delivery.message_path,
            size=delivery.size,
        )
        upstream: list[RecipientResult] = await self.upstream.deliver(again)
        for i, result in zip(retry, upstream, strict=True):
            results[i] = result
        return results
