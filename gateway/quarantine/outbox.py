"""SpoolOutbox: the gateway's own mail (notices, auto-replies, reports) into the queue.

It is queued through the one way in (`ISpool.new_message().commit()`) as a
message from the gateway itself, allowed to relay, without the filter chains: it
was written here. Delivery, retries and bounces are those of any message.
"""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from gateway.interfaces import IOutbox, ISpool
from gateway.model import Envelope, Recipient, Role, Session

log = Logger(namespace="mailgate.outbox")


@implementer(IOutbox)
class SpoolOutbox:
    """An IOutbox writing into the spool (see the module docstring)."""

    def __init__(self, spool: ISpool, hostname: str, postmaster: str) -> None:
        self.spool = spool
        self.hostname = hostname
        self.postmaster = postmaster

    def send(self, mail_from: str, rcpt_to: tuple[str, ...], message: bytes) -> Deferred[str]:
        if not rcpt_to:
            return fail(ValueError("a message of the gateway's own needs at least one recipient"))
        incoming = self.spool.new_message()
        stamp = email.utils.formatdate(localtime=True)
        incoming.write(
            f"Received: by {self.hostname} (MailGate) id {incoming.queue_id}; {stamp}\r\n".encode("ascii")
        )
        incoming.write(message)
        session = Session("127.0.0.1", listener="gateway", role=Role.SUBMISSION, may_relay=True)
        envelope = Envelope(mail_from, tuple(Recipient(address) for address in rcpt_to))
        committed: Deferred[str] = incoming.commit(envelope, session)

        def sent(queue_id: str) -> str:
            log.info(
                "{queue_id}: from=<{sender}>, nrcpt={count} (the gateway's own mail)",
                queue_id=queue_id,
                sender=mail_from,
                count=len(rcpt_to),
            )
            return queue_id

        return committed.addCallback(sent)


def compose(
    hostname: str,
    sender: str,
    to: tuple[str, ...],
    subject: str,
    text: str,
    *,
    auto_submitted: str = "auto-generated",
) -> bytes:
    """A plain-text message (UTF-8, CRLF) from the gateway: for notices and auto-replies."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender or f"MAILER-DAEMON@{hostname}"
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid(domain=hostname)
    message["Auto-Submitted"] = auto_submitted  # RFC 3834: no auto-reply to this
    message.set_content(text, charset="utf-8")
    return message.as_bytes()
