"""Fakes of the gateway's seams, for tests of the parts that use them."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gateway.interfaces import IIncomingMessage, IReception
from gateway.model import Envelope, Quarantine, Recipient, Session
from gateway.smtp.reply import Reply

_QUEUE_IDS = itertools.count(1)


@implementer(IIncomingMessage)
class RecordedMessage:
    """An IIncomingMessage kept in memory: the bytes written, and its fate."""

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        self.chunks: list[bytes] = []
        self.size = 0
        self.aborted = False
        self.committed = False
        self.added = 0  # add_headers calls
        self.held = False
        self.quarantine: Quarantine | None = None
        self.subject_prefix = ""

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        if self.aborted or self.committed:
            raise RuntimeError(f"write to a finished message {self.queue_id}")
        self.chunks.append(bytes(data))
        self.size += len(data)

    def add_headers(self, data: bytes) -> None:
        self.chunks.insert(1 + self.added, data)  # after the first write, as the spools do
        self.added += 1
        self.size += len(data)

    def prefix_subject(self, prefix: str) -> None:
        self.subject_prefix = prefix

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.data)

    def commit(
        self, envelope: Envelope, session: Session, hold: bool = False, quarantine: Quarantine | None = None
    ) -> Deferred[str]:
        self.committed = True
        self.held = hold or quarantine is not None
        self.quarantine = quarantine
        return succeed(self.queue_id)

    def abort(self) -> None:
        self.aborted = True


@implementer(IReception)
class RecordingReception:
    """An IReception that records what it was asked and answers as told.

    - `refuse_mail` / `refuse_rcpt`: address -> Reply to refuse with;
    - `accept_result`: the end-of-data Reply, or an exception to fail with;
    - `hold=True`: every check returns an unfired Deferred, kept in `pending`,
      to be fired (in order) by `release()` - for pipelining tests.
    """

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.refuse_mail: dict[str, Reply] = {}
        self.refuse_rcpt: dict[str, Reply] = {}
        self.accept_result: Reply | Exception | None = None  # None: 250 queued as <id>
        self.calls: list[tuple[str, Any]] = []  # ("mail", sender), ("rcpt", address), ...
        self.sessions: list[Session] = []  # the session seen by each call
        self.messages: list[RecordedMessage] = []
        self.accepted: list[tuple[Envelope, RecordedMessage]] = []
        self.pending: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def _answer(self, result: Callable[[], Any]) -> Deferred[Any]:
        if not self.hold:
            try:
                return succeed(result())
            except Exception as error:
                return fail(error)
        deferred: Deferred[Any] = Deferred()
        self.pending.append((deferred, result))
        return deferred

    def release(self, count: int | None = None) -> None:
        """Fire the first `count` (default: all) pending answers, oldest first."""
        while self.pending and (count is None or count > 0):
            deferred, result = self.pending.pop(0)
            try:
                value = result()
            except Exception as error:
                deferred.errback(error)
            else:
                deferred.callback(value)
            if count is not None:
                count -= 1

    def new_message(self, session: Session) -> RecordedMessage:
        message = RecordedMessage(f"Q{next(_QUEUE_IDS):05d}")
        self.messages.append(message)
        self.calls.append(("new_message", message.queue_id))
        self.sessions.append(session)
        return message

    def check_mail(self, session: Session, envelope: Envelope) -> Deferred[Reply | None]:
        self.calls.append(("mail", envelope.mail_from))
        self.sessions.append(session)
        return self._answer(lambda: self.refuse_mail.get(envelope.mail_from))

    def check_rcpt(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Deferred[Reply | None]:
        self.calls.append(("rcpt", recipient.address))
        self.sessions.append(session)
        return self._answer(lambda: self.refuse_rcpt.get(recipient.address))

    def accept(self, session: Session, envelope: Envelope, message: IIncomingMessage) -> Deferred[Reply]:
        assert isinstance(message, RecordedMessage)  # the one new_message handed out
        self.calls.append(("accept", message.queue_id))
        self.sessions.append(session)

        def result() -> Reply:
            outcome = self.accept_result
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is not None and not outcome.is_positive:
                message.abort()
                return outcome
            message.commit(envelope, session)
            self.accepted.append((envelope, message))
            return outcome or Reply(250, "2.0.0", f"Ok: queued as {message.queue_id}")

        return self._answer(result)

    def open_session(self, session: Session, counts: Callable[[], dict[str, int]]) -> RecordingChecks:
        return RecordingChecks(self)

    etrn_reply: Reply = Reply(250, "2.0.0", "Queuing started")


class RecordingChecks:
    """A `RecordingReception`'s per-connection checks: MAIL, RCPT and DATA go to it."""

    def __init__(self, reception: RecordingReception) -> None:
        self.reception = reception
        self.closed = False

    def connect(self, session: Session) -> Deferred[Reply | None]:
        return succeed(None)

    def helo(self, session: Session) -> Deferred[Reply | None]:
        return succeed(None)

    def mail(self, session: Session, envelope: Envelope) -> Deferred[Reply | None]:
        return self.reception.check_mail(session, envelope)

    def rcpt(self, session: Session, envelope: Envelope, recipient: Recipient) -> Deferred[Reply | None]:
        return self.reception.check_rcpt(session, envelope, recipient)

    def auth_allowed(self, session: Session) -> Deferred[Reply | None]:
        return succeed(None)

    def auth_result(self, session: Session, user: str, success: bool) -> float:
        return 0.0

    def header_block(self) -> bytes:
        return b""

    def new_message(self, session: Session) -> RecordedMessage:
        return self.reception.new_message(session)

    def accept(self, session: Session, envelope: Envelope, message: IIncomingMessage) -> Deferred[Reply]:
        return self.reception.accept(session, envelope, message)

    def etrn(self, session: Session, domain: str) -> Reply:
        self.reception.calls.append(("etrn", domain))
        return self.reception.etrn_reply

    def close(self) -> None:
        self.closed = True
