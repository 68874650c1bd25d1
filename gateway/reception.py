"""The way into the queue for the SMTP front door: relay control, then the spool.

Every ingress ends in `Reception.accept`, which commits the message and answers
`250` only once it is durable; any failure there is a `451`, never a `5xx`.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import RelayConfig
from gateway.interfaces import IIncomingMessage, IReception, ISpool
from gateway.model import Envelope, Recipient, Role, Session
from gateway.smtp.reply import Reply

log = Logger(namespace="mailgate.smtpd")

RELAY_DENIED = "Relay access denied"


@implementer(IReception)
class Reception:
    """Relay control and the hand-over to the spool, for SMTP listeners."""

    def __init__(
        self,
        spool: ISpool,
        relay: RelayConfig,
    ) -> None:
        self.spool = spool
        self.relay = relay

    def new_message(self, session: Session) -> IIncomingMessage:
        return self.spool.new_message()

    def check_mail(self, session: Session, envelope: Envelope) -> Deferred[Reply | None]:
        if session.role is Role.SUBMISSION and not session.may_relay:
            # a submission port is for internal servers and authenticated users only
            return succeed(Reply(530, "5.7.0", "Authentication required"))
        return succeed(None)

    def check_rcpt(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Deferred[Reply | None]:
        if session.may_relay:
            return succeed(None)
        domain = recipient.address.rpartition("@")[2]
        if "@" in recipient.address and self.relay.accepts_domain(domain):
            return succeed(None)
        if recipient.address.lower() == "postmaster":
            return succeed(None)  # RFC 5321 4.5.1: postmaster without a domain
        log.info(
            "reject: RCPT from [{peer}]: {reason}; from=<{sender}> to=<{rcpt}>",
            peer=session.peer_host,
            reason=RELAY_DENIED,
            sender=envelope.mail_from,
            rcpt=recipient.address,
        )
        return succeed(Reply(554, "5.7.1", f"<{recipient.address}>: {RELAY_DENIED}"))

    def accept(self, session: Session, envelope: Envelope, message: IIncomingMessage) -> Deferred[Reply]:
        queue_id = message.queue_id
        committed: Deferred[str] = message.commit(envelope, session)

        def queued(queue_id: str) -> Reply:
            log.info(
                "{queue_id}: from=<{sender}>, size={size}, nrcpt={count} (queue active)",
                queue_id=queue_id,
                sender=envelope.mail_from,
                size=message.size,
                count=len(envelope.rcpt_to),
            )
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(failure: Failure) -> Reply:
            log.error(
                "{queue_id}: cannot queue the message: {error}",
                queue_id=queue_id,
                error=failure.getErrorMessage(),
            )
            return Reply(451, "4.3.0", "Temporary failure: cannot queue the message, try again")

        return committed.addCallbacks(queued, failed)
