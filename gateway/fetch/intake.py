"""One fetched message into the queue, through the reception and the "fetched" chain.

`Intake.take(account, session, message)` does what an SMTP client would, on
the reception's `SessionChecks`, as a session with ``fetched_from`` set (so
the "fetched" chain runs and a filter's refusal becomes quarantine, a tag or
a deletion, per ``fetch.on_refusal``):

1. a new spool message; its first write is our Received header
   ("Received: from <server> by <hostname> with POP3 (MailGate account <name>)
   id <queue id> for <recipient>; <date>", "for" only when the message has one
   recipient known before it is read: single-drop to one address);
2. the message streamed from the server into it (`session.retrieve`);
3. the envelope: the sender is the message's first Return-Path (which the
   external server's MDA wrote from its own MAIL FROM), or <> when there is
   none or it is not an address; the recipients are the account's `deliver_to`
   (single-drop) or the multidrop routing of the headers. With ``sdps`` (POP3
   multidrop) the server's envelope (``*ENV``) comes first: its recipients
   are routed ahead of the headers (as the first envelope header, named
   "SDPS" in the log) and its sender replaces Return-Path; a server refusing
   *ENV gets a warning and the headers alone. A multidrop copy
   of a Message-ID a recipient already got (within `DUPLICATE_TTL`) is not
   sent again to that recipient;
4. MAIL, RCPT per recipient, end of data. A recipient refused (5xx) at RCPT
   is replaced by the account's postmaster; a refusal at MAIL, or of every
   recipient and the postmaster too, keeps the message held in the quarantine
   (the operator can release it): fetched mail is never lost.

The result says whether the message is `done` (durable in the spool, or a
duplicate for every recipient): only then may the poller record its UID
and delete it on the server. Anything temporary (a 4xx anywhere, the spool
failing) leaves it on the server for the next poll.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.fetch import FetchError, IMailboxSession, ProtocolViolation, RemoteMessage
from gateway.fetch.accounts import FetchAccount
from gateway.fetch.multidrop import Routing, duplicate_key, header_fields, header_values, route
from gateway.interfaces import IIncomingMessage
from gateway.model import Body, Envelope, Quarantine, Recipient, Session
from gateway.smtp.reply import Reply
from gateway.state import IStateStore

__all__ = ["DUPLICATE_TABLE", "DUPLICATE_TTL", "Intake", "IntakeResult", "envelope_sender", "received_header"]

log = Logger(namespace="mailgate.fetch")

DUPLICATE_TABLE = "fetch.duplicates"
DUPLICATE_TTL = 7 * 86400.0  # a copy of the same Message-ID for the same recipient within this: dropped
SDPS = "SDPS"  # the envelope recipients' place among the multidrop headers (and the routing's source)
HEAD_LIMIT = 256 * 1024  # octets of header read for the envelope (the rest of a huge header is body to us)


@attrs.frozen
class IntakeResult:
    """What became of one fetched message."""

    done: bool  # durable in the spool (or a duplicate for all): the UID may be recorded, the message deleted
    reply: str  # the reception's last reply, one line ("250 2.0.0 Ok: queued as ...", "451 ...")
    size: int = 0  # octets retrieved
    queue_id: str | None = None
    recipients: tuple[str, ...] = ()
    duplicates: tuple[str, ...] = ()  # recipients who already had this Message-ID (multidrop)


@attrs.frozen
class Retrieved:
    """A message retrieved into the spool, not yet queued: `queue()` it, or `forget()` it."""

    queue: Callable[[], Deferred[IntakeResult]]
    forget: Callable[[], None]


class Intake:
    """Fetched messages into the queue through a reception (see the module docstring)."""

    def __init__(
        self,
        reception: Any,
        store: IStateStore,
        clock: IReactorTime,
        hostname: str,
        postmaster: str,
        *,
        duplicate_ttl: float = DUPLICATE_TTL,
    ) -> None:
        """`reception`: a `gateway.reception.Reception` (its `open_session`); `postmaster`:
        the gateway's, for accounts that name none."""
        self.reception = reception
        self.store = store
        self.clock = clock
        self.hostname = hostname
        self.postmaster = postmaster
        self.duplicate_ttl = duplicate_ttl

    def take(
        self, account: FetchAccount, mailbox: IMailboxSession, message: RemoteMessage
    ) -> Deferred[IntakeResult]:
        """Retrieve `message` and queue it; fails only if the retrieval does (nothing queued then)."""

        async def both() -> IntakeResult:
            retrieved = await self.retrieve(account, mailbox, message)
            return await retrieved.queue()

        return Deferred.fromCoroutine(both())

    def retrieve(
        self, account: FetchAccount, mailbox: IMailboxSession, message: RemoteMessage
    ) -> Deferred[Retrieved]:
        """Retrieve `message` into the spool (the connection's part); fires with what queues it.

        The poller retrieves the next message while this one is being queued (the
        filters, the fsync): the connection and the disk work at the same time.
        """
        return Deferred.fromCoroutine(self._retrieve(account, mailbox, message))

    async def _retrieve(
        self, account: FetchAccount, mailbox: IMailboxSession, message: RemoteMessage
    ) -> Retrieved:
        session = Session(
            account.server,
            account.port,
            tls=account.tls != "none",
            may_relay=True,
            fetched_from=account.source,
        )
        checks = self.reception.open_session(session)
        incoming: IIncomingMessage = checks.new_message(session)
        try:
            single = account.deliver_to[0] if len(account.deliver_to) == 1 else None
            incoming.write(
                received_header(account, self.hostname, incoming.queue_id, single, self.clock.seconds())
            )
            sdps = await self._sdps(account, mailbox, message)
            writer = _Writer(incoming.write)
            size = await mailbox.retrieve(message, writer)
        except BaseException:
            incoming.abort()
            checks.close()
            raise

        async def queue() -> IntakeResult:
            try:
                return await self._queue(account, session, checks, incoming, size, writer.eight_bit, sdps)
            except BaseException:
                incoming.abort()
                raise
            finally:
                checks.close()

        def forget() -> None:
            incoming.abort()
            checks.close()

        return Retrieved(lambda: Deferred.fromCoroutine(queue()), forget)

    async def _sdps(
        self, account: FetchAccount, mailbox: IMailboxSession, message: RemoteMessage
    ) -> tuple[str, tuple[str, ...]] | None:
        """The SDPS envelope (sender, recipients) of a message, or None (no SDPS here)."""
        if not account.sdps or account.multidrop is None:
            return None
        try:
            sender, recipients = await cast(Any, mailbox).envelope(message)  # Pop3Session (config: POP3)
        except ProtocolViolation:
            raise  # the connection is gone
        except FetchError as error:
            log.warn(
                "fetch: {account}: no SDPS envelope for {uid}, routing by the headers alone: {error}",
                account=account.name,
                uid=message.uid,
                error=str(error),
            )
            return None
        return str(sender), tuple(recipients)

    async def _queue(
        self,
        account: FetchAccount,
        session: Session,
        checks: Any,
        incoming: IIncomingMessage,
        size: int,
        eight_bit: bool,
        sdps: tuple[str, tuple[str, ...]] | None = None,
    ) -> IntakeResult:
        fields = header_fields(_head(incoming))
        sender = envelope_sender(fields) if sdps is None else sdps[0]
        postmaster = account.postmaster or self.postmaster
        if account.multidrop is not None:
            multidrop = account.multidrop
            routed = fields
            if sdps is not None:  # the envelope first, as if it were the first envelope header
                multidrop = attrs.evolve(multidrop, headers=(SDPS, *multidrop.headers))
                routed = [(SDPS, f"<{recipient}>") for recipient in sdps[1]] + fields
            routing = route(multidrop, routed, account.multidrop.unknown or postmaster)
        else:
            routing = Routing(account.deliver_to, "deliver_to")
        if routing.unknown:
            log.info(
                "fetch: {account}: no internal user for {unknown}: sent to <{target}>",
                account=account.name,
                unknown=", ".join(f"<{address}>" for address in routing.unknown),
                target=account.multidrop.unknown or postmaster if account.multidrop else postmaster,
            )
        recipients = list(routing.recipients)
        message_id = next(iter(header_values(fields, "Message-ID")), "").strip()
        duplicates: list[str] = []
        if account.multidrop is not None and message_id:
            for recipient in list(recipients):
                if await self.store.get(DUPLICATE_TABLE, duplicate_key(message_id, recipient)) is not None:
                    recipients.remove(recipient)
                    duplicates.append(recipient)
        if not recipients:
            incoming.abort()
            log.info(
                "fetch: {account}: {message_id} already delivered to {recipients}: not queued again",
                account=account.name,
                message_id=message_id,
                recipients=", ".join(duplicates),
            )
            return IntakeResult(True, "250 duplicate", size, duplicates=tuple(duplicates))
        body = Body.EIGHT_BIT if eight_bit else Body.SEVEN_BIT
        envelope = Envelope(sender, (), body=body)
        refused = await checks.mail(session, envelope)
        if refused is not None:
            if refused.code < 500:
                incoming.abort()
                return IntakeResult(False, _line(refused), size)
            return await self._hold(
                account,
                session,
                incoming,
                Envelope(sender, _rcpts(recipients), body=body),
                size,
                refused,
                "MAIL FROM",
            )
        accepted: list[str] = []
        turned: list[tuple[str, Reply]] = []
        for recipient in _distinct([*recipients]):
            reply = await checks.rcpt(session, envelope, Recipient(recipient))
            if reply is None:
                accepted.append(recipient)
                envelope = attrs.evolve(envelope, rcpt_to=_rcpts(accepted))
            elif reply.code < 500:
                incoming.abort()
                return IntakeResult(False, _line(reply), size)
            else:
                turned.append((recipient, reply))
        if turned:
            for recipient, reply in turned:
                log.info(
                    "fetch: {account}: <{recipient}> refused ({reply}): sent to <{postmaster}> instead",
                    account=account.name,
                    recipient=recipient,
                    reply=_line(reply),
                    postmaster=postmaster,
                )
            if postmaster.lower() not in (address.lower() for address in accepted):
                reply = await checks.rcpt(session, envelope, Recipient(postmaster))
                if reply is None:
                    accepted.append(postmaster)
                    envelope = attrs.evolve(envelope, rcpt_to=_rcpts(accepted))
                elif reply.code < 500:
                    incoming.abort()
                    return IntakeResult(False, _line(reply), size)
                elif not accepted:
                    everyone = Envelope(sender, _rcpts([*recipients, postmaster]), body=body)
                    return await self._hold(account, session, incoming, everyone, size, reply, "RCPT TO")
        answer: Reply = await checks.accept(session, envelope, incoming)
        if answer.code != 250:
            # 4xx: try again next poll. (A 5xx cannot come for fetched mail: the reception
            # turns refusals into quarantine/tag/delete; if one did, keeping it is the safe side.)
            return IntakeResult(False, _line(answer), size, recipients=tuple(accepted))
        queue_id = _queue_id(answer)
        if account.multidrop is not None and message_id:
            await self._remember(account, message_id, accepted)
        return IntakeResult(True, _line(answer), size, queue_id, tuple(accepted), tuple(duplicates))

    async def _hold(
        self,
        account: FetchAccount,
        session: Session,
        incoming: IIncomingMessage,
        envelope: Envelope,
        size: int,
        refused: Reply,
        where: str,
    ) -> IntakeResult:
        """Refused before its end, yet nobody to refuse it to: kept in the quarantine."""
        reason = f"refused at {where}: {_line(refused)}"
        quarantine = Quarantine(reason=reason, direction="fetched")
        try:
            queue_id = await incoming.commit(envelope, session, quarantine=quarantine)
        except Exception as error:
            log.error(
                "fetch: {account}: cannot hold a refused message: {error}", account=account.name, error=error
            )
            return IntakeResult(False, f"451 4.3.0 cannot queue the message: {error}", size)
        log.info(
            "{queue_id}: fetched by {account}, {reason}: held",
            queue_id=queue_id,
            account=account.name,
            reason=reason,
        )
        return IntakeResult(
            True, f"250 held as {queue_id}", size, queue_id, tuple(r.address for r in envelope.rcpt_to)
        )

    async def _remember(self, account: FetchAccount, message_id: str, recipients: list[str]) -> None:
        for recipient in recipients:
            try:
                await self.store.put(
                    DUPLICATE_TABLE, duplicate_key(message_id, recipient), True, ttl=self.duplicate_ttl
                )
            except Exception as error:  # queued all the same: at worst a later duplicate goes through
                log.warn(
                    "fetch: {account}: cannot remember {message_id} for duplicates: {error}",
                    account=account.name,
                    message_id=message_id,
                    error=error,
                )


class _Writer:
    """Passes the retrieved pieces on, noting whether any byte is 8-bit (for BODY=8BITMIME)."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self.eight_bit = False

    def __call__(self, piece: bytes) -> None:
        if not self.eight_bit and not piece.isascii():
            self.eight_bit = True
        self.write(piece)


def received_header(
    account: FetchAccount, hostname: str, queue_id: str, recipient: str | None, when: float
) -> bytes:
    """Our trace header for a fetched message (CRLF-ended, folded once)."""
    protocol = account.protocol.upper()
    clause = f" for <{recipient}>" if recipient else ""
    date = email.utils.formatdate(when, localtime=True)
    text = (
        f"Received: from {account.server} by {hostname} with {protocol} (MailGate account {account.name})"
        f"\r\n\tid {queue_id}{clause}; {date}\r\n"
    )
    lines = text.split("\r\n")
    return "\r\n".join(line.replace("\r", " ").replace("\n", " ") for line in lines).encode(
        "utf-8", "replace"
    )


def envelope_sender(fields: list[tuple[str, str]]) -> str:
    """The sender for the envelope: the first Return-Path's address, "" for <> or anything else."""
    values = header_values(fields, "Return-Path")
    if not values:
        return ""
    value = values[0].strip()
    if value.startswith("<") and ">" in value:
        value = value[1 : value.index(">")]
    value = value.strip()
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(char.isspace() or char in "<>()," for char in value):
        return ""
    return value


def _head(incoming: IIncomingMessage) -> bytes:
    """The message's header block (at most HEAD_LIMIT octets), as written so far."""
    with incoming.open() as handle:
        head = b""
        while len(head) < HEAD_LIMIT:
            piece = handle.read(16384)
            if not piece:
                break
            head += piece
            if b"\n\r\n" in head or b"\n\n" in head:
                break
    return head[:HEAD_LIMIT]


def _rcpts(addresses: list[str]) -> tuple[Recipient, ...]:
    return tuple(Recipient(address) for address in addresses)


def _distinct(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    found = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            found.append(address)
    return found


def _line(reply: Reply) -> str:
    return " ".join(str(part) for part in (reply.code, reply.enhanced, reply.text) if part)


def _queue_id(reply: Reply) -> str | None:
    words = str(reply.text).split()
    return words[-1] if words else None
