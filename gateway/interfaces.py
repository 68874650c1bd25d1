"""The seams between the rooms of the gateway.

Each is a zope.interface; implementations say what they are (`DirectorySpool`,
`SmtpTransport`), fakes are `Memory...` and pass the same contract tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from gateway.model import Delivery, Envelope, QueuedMessage, Recipient, RecipientResult, Session
    from gateway.smtp.reply import Reply


class IIncomingMessage(Interface):
    """A message being received, before it is committed to the spool.

    The front door writes the bytes as they arrive (the Received header first);
    memory stays bounded because the spool spills to disk as it goes.
    """

    queue_id = Attribute("str: the queue id this message will have once committed")
    size = Attribute("int: bytes written so far")

    def write(data: bytes) -> None:
        """Append message bytes (CRLF line ends, dot-unstuffed)."""

    def commit(envelope: Envelope, session: Session) -> Deferred[str]:
        """Make the message durable: message and envelope fsync'ed, directory entries too.

        Returns a Deferred firing with the queue id only once everything is on disk.
        It fails (never silently) if the disk is full or the write fails; the
        caller then answers 4xx and nothing was acknowledged.
        """

    def abort() -> None:
        """Forget the message (client gave up, size exceeded, rejected)."""


class ISpool(Interface):
    """The durable queue. `new_message().commit()` is the only way in."""

    def new_message() -> IIncomingMessage:
        """Start receiving a message; returns an IIncomingMessage."""

    def recover() -> Deferred[int]:
        """On start: clean half-written files, requeue active messages.

        Returns a Deferred firing with the number of messages requeued.
        """

    def list(state: str) -> list[str]:
        """Queue ids in a state ("incoming", "active", "deferred", "hold", "corrupt")."""

    def load(queue_id: str) -> QueuedMessage:
        """The QueuedMessage for an id (KeyError if unknown)."""

    def update(message: QueuedMessage) -> Deferred[None]:
        """Durably record a QueuedMessage's new recipient states / schedule / state.

        Moves it to `message.state` if that changed. Returns a Deferred.
        """

    def remove(queue_id: str) -> Deferred[None]:
        """Delete a message (all delivered or bounced, or operator delete). Deferred."""

    def message_path(queue_id: str) -> str:
        """The path of the stored message bytes (read-only for transports)."""


class ITransport(Interface):
    """A way out of the queue (smtp, mx, relay, lmtp, maildir)."""

    name = Attribute("str: the transport spec it was built from, for logs")

    def deliver(delivery: Delivery) -> Deferred[list[RecipientResult]]:
        """Deliver one message to some recipients.

        `delivery` is a `gateway.delivery.model.Delivery`. Returns a Deferred
        firing with a list of `RecipientResult`, one per recipient, in order.
        The Deferred never fails for a remote refusal: each recipient's reply
        says positive / transient / permanent. It fails only on a bug.
        """


class IResolver(Interface):
    """DNS for delivery: Deferred-returning lookups."""

    def lookup_mx(domain: str) -> Deferred[list[tuple[int, str]]]:
        """[(preference, host)] sorted; [] if the domain has no MX (implicit MX).

        Fails with `NullMX` for RFC 7505 null MX, `NoSuchDomain` for NXDOMAIN,
        `DnsTemporaryError` for SERVFAIL/timeouts.
        """

    def lookup_addresses(host: str) -> Deferred[list[str]]:
        """[ip, ...] from AAAA and A records; same errors."""


class IReception(Interface):
    """What the SMTP server asks before and after DATA (relay control, filters, spool)."""

    def new_message(session: Session) -> IIncomingMessage:
        """An IIncomingMessage for the transaction that is starting DATA/BDAT."""

    def check_mail(session: Session, envelope: Envelope) -> Deferred[Reply | None]:
        """Deferred[Reply | None]: None accepts MAIL FROM; a Reply refuses it."""

    def check_rcpt(session: Session, envelope: Envelope, recipient: Recipient) -> Deferred[Reply | None]:
        """Deferred[Reply | None]: None accepts this RCPT TO; a Reply refuses it."""

    def accept(session: Session, envelope: Envelope, message: IIncomingMessage) -> Deferred[Reply]:
        """End of data: Deferred[Reply]; 250 only once the message is durable."""
