"""The LMTP transport (RFC 2033): "lmtp:[host]:port" or "lmtp:unix:/path/to/socket".

The conversation is the SMTP client's in LMTP mode (LHLO; after the final dot,
one reply per accepted recipient), so a mailbox server can refuse one recipient
(over quota) and take the others.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from gateway.delivery.connections import Dialer, Target, deliver_in_turn
from gateway.delivery.router import TransportSpec, TransportSpecError, parse_transport
from gateway.delivery.smtp import SmtpTransport
from gateway.interfaces import IResolver, ITransport
from gateway.model import Delivery, RecipientResult
from gateway.smtp.client import TlsPolicy


@implementer(ITransport)
class LmtpTransport:
    """Delivery to an LMTP server over TCP or a UNIX socket."""

    def __init__(
        self,
        spec: str | TransportSpec,
        dialer: Dialer,
        resolver: IResolver,
        *,
        tls: TlsPolicy = TlsPolicy.NONE,
    ) -> None:
        self.spec = parse_transport(spec) if isinstance(spec, str) else spec
        if self.spec.kind != "lmtp":
            raise TransportSpecError(f"{self.spec.text!r} is not an lmtp: transport")
        self.name = self.spec.text
        self.dialer = dialer
        self._tcp = (
            SmtpTransport(TransportSpec("smtp", hosts=self.spec.hosts), dialer, resolver, tls=tls, lmtp=True)
            if self.spec.hosts
            else None
        )

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        if self._tcp is not None:
            return self._tcp.deliver(delivery)
        return ensureDeferred(self._deliver_unix(delivery))

    async def _deliver_unix(self, delivery: Delivery) -> list[RecipientResult]:
        target = Target(self.spec.path, self.spec.path, 0, TlsPolicy.NONE, lmtp=True, unix=True)
        results = await deliver_in_turn(self.dialer, [target], delivery, delivery.recipients)
        return [results[i].result for i in range(len(delivery.recipients))]
