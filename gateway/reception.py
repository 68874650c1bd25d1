"""The way into the queue for the SMTP front door: relay control, the filter chain, the spool.

`Reception.open_session` gives the SMTP server one `SessionChecks` per
connection. It runs the session's filter chain at each stage (connect, HELO,
MAIL, RCPT, end of data), turns verdicts into SMTP replies, remembers what the
filters said about the transaction (tags, holds, redirects, copies, discards, per
recipient), and at the end commits the message and answers ``250`` only once it
is durable. Any failure there is a ``451``, never a ``5xx``.

Which chain: sessions on a submission listener, from ``relay.networks`` or
authenticated run the outbound chain; the rest of the Internet the inbound one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import RelayConfig
from gateway.content import ContentLimits, MessageContent
from gateway.filters import Request
from gateway.filters.chain import ChainRunner, Hit, Outcome
from gateway.interfaces import (
    IAcceptObserver,
    IAuthGuard,
    IIncomingMessage,
    IReception,
    ISpool,
)
from gateway.model import (
    Action,
    Direction,
    Envelope,
    Quarantine,
    Recipient,
    Role,
    Session,
    Stage,
    Verdict,
)
from gateway.smtp.reply import Reply

log = Logger(namespace="mailgate.smtpd")

RELAY_DENIED = "Relay access denied"
_NO_FILTERS = ChainRunner({}, None)  # type: ignore[arg-type]


def direction_of(session: Session) -> Direction:
    if session.fetched_from is not None:
        return Direction.FETCHED
    if session.role is Role.SUBMISSION or session.may_relay:
        return Direction.OUTBOUND
    return Direction.INBOUND


def refusal(outcome: Outcome, stage: Stage) -> Reply | None:
    """The SMTP reply for a stage's outcome, or None when it lets the client go on."""
    verdict = outcome.verdict
    if verdict.action is Action.REJECT:
        code = verdict.code if verdict.code and 500 <= verdict.code < 600 else 554
        enhanced = verdict.enhanced or "5.7.1"
        return Reply(code, enhanced, verdict.reason or "Rejected by policy")
    if verdict.action is Action.DEFER:
        if stage is Stage.CONNECT:
            return Reply(421, verdict.enhanced or "4.7.1", verdict.reason or "Try again later")
        code = verdict.code if verdict.code and 400 <= verdict.code < 500 else 451
        return Reply(code, verdict.enhanced or "4.7.1", verdict.reason or "Try again later")
    return None


@implementer(IReception)
class Reception:
    """Relay control, the filter chains and the hand-over to the spool, for SMTP listeners."""

    def __init__(
        self,
        spool: ISpool,
        relay: RelayConfig,
        runner: ChainRunner | None = None,
        *,
        headers: bool = True,
        content: Callable[[IIncomingMessage], MessageContent] | None = None,
        keep_rejected: bool = False,
        fetched_refusal: str = "quarantine",
    ) -> None:
        """`content` makes the DATA stage's view of a message (parsed off the reactor
        by `gateway.content.ContentReader` in the gateway; in the caller's thread by
        default). `keep_rejected`: a message refused at its end is kept in the
        quarantine (kind "rejected") for false-positive review. `fetched_refusal`:
        what a refusal (5xx) of fetched mail becomes, since nobody can be refused:
        "quarantine", "tag" (delivered with an X-Mailgate-Refused header) or
        "delete" (logged); the poller is told 250 for all three."""
        self.spool = spool
        self.relay = relay
        self.runner = runner or _NO_FILTERS
        self.headers = headers
        self.content = content or _content_here
        self.keep_rejected = keep_rejected
        self.fetched_refusal = fetched_refusal
        # ETRN <domain>: flush the queue for it and fetch its mailboxes now (set by the
        # process that can: the main process, or a worker passing it on); None: refused
        self.etrn: Callable[[str], None] | None = None
        filters = list(self.runner.all_filters())
        self.auth_guards = [f for f in filters if IAuthGuard.providedBy(f)]
        # told about the messages of their own chain only
        self.accept_observers = {
            direction: [link.filter for link in links if IAcceptObserver.providedBy(link.filter)]
            for direction, links in self.runner.chains.items()
        }

    def open_session(
        self, session: Session, counts: Callable[[], dict[str, int]] | None = None
    ) -> SessionChecks:
        return SessionChecks(self, session, counts or dict)

    def relay_refusal(self, session: Session, envelope: Envelope, recipient: Recipient) -> Reply | None:
        if session.may_relay:
            return None
        domain = recipient.address.rpartition("@")[2]
        if "@" in recipient.address and self.relay.accepts_domain(domain):
            return None
        if recipient.address.lower() == "postmaster":
            return None  # RFC 5321 4.5.1: postmaster without a domain
        log.info(
            "reject: RCPT from [{peer}]: {reason}; from=<{sender}> to=<{rcpt}>",
            peer=session.peer_host,
            reason=RELAY_DENIED,
            sender=envelope.mail_from,
            rcpt=recipient.address,
        )
        return Reply(554, "5.7.1", f"<{recipient.address}>: {RELAY_DENIED}")


@attrs.define
class _Transaction:
    """What the filters said about the current transaction."""

    hits: list[Hit] = attrs.field(factory=list)
    tags: list[Verdict] = attrs.field(factory=list)
    hold: str | None = None  # the reason, when a filter held the message
    discard: str | None = None  # the reason, when a filter discarded the whole message
    redirect: str | None = None  # every recipient goes here instead
    redirects: dict[str, str] = attrs.field(factory=dict)  # recipient -> new address
    discarded: set[str] = attrs.field(factory=set)  # recipients delivered to nobody
    copies: list[str] = attrs.field(factory=list)


class SessionChecks:
    """The reception's side of one SMTP session (see the module docstring)."""

    def __init__(self, reception: Reception, session: Session, counts: Callable[[], dict[str, int]]) -> None:
        self.reception = reception
        self.session = session
        self._counts = counts
        self.unknown_recipients = 0
        self.observers: tuple[Any, ...] = ()  # filters of the connect stage to tell of the end
        self.connect_level = _Transaction()  # what the connect stage said: for every message
        self.helo_level = _Transaction()  # what the last HELO/EHLO's stage said: for every message
        self.transaction = _Transaction()

    @property
    def session_level(self) -> _Transaction:
        """What the connect and HELO stages said, together."""
        first, then = self.connect_level, self.helo_level
        return _Transaction(
            hits=[*first.hits, *then.hits],
            tags=[*first.tags, *then.tags],
            hold=first.hold or then.hold,
            discard=first.discard or then.discard,
            redirect=then.redirect or first.redirect,
            redirects={**first.redirects, **then.redirects},
            discarded=first.discarded | then.discarded,
            copies=[*first.copies, *then.copies],
        )

    # --- stages --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = dict(self._counts())
        counts["unknown_recipients"] = self.unknown_recipients
        return counts

    def _request(
        self,
        stage: Stage,
        session: Session,
        envelope: Envelope | None = None,
        recipient: Recipient | None = None,
        message: MessageContent | None = None,
    ) -> Request:
        self.session = session
        return Request(stage, direction_of(session), session, envelope, recipient, self.counts(), message)

    def _run(self, request: Request, into: _Transaction) -> Deferred[Reply | None]:
        def decided(outcome: Outcome) -> Reply | None:
            reply = refusal(outcome, request.stage)
            if reply is None:
                self._record(outcome, into, request)
            elif request.stage is Stage.RCPT and reply.enhanced == "5.1.1":
                self.unknown_recipients += 1
            # a refused recipient (or HELO) leaves nothing behind: no tags, no copies
            return reply

        return self.reception.runner.run(request).addCallback(decided)

    def connect(self, session: Session) -> Deferred[Reply | None]:
        """Before the banner: None sends 220; a Reply is sent instead and the session ends."""
        self.observers = self.reception.runner.session_observers(direction_of(session))
        return self._run(self._request(Stage.CONNECT, session), self.connect_level)

    def helo(self, session: Session) -> Deferred[Reply | None]:
        """`session` has the new HELO name; a Reply refuses it."""
        self.helo_level = _Transaction()  # a new HELO (after STARTTLS, say) replaces the last one's
        return self._run(self._request(Stage.HELO, session), self.helo_level)

    def mail(self, session: Session, envelope: Envelope) -> Deferred[Reply | None]:
        self.transaction = _Transaction()
        if session.role is Role.SUBMISSION and not session.may_relay:
            # a submission port is for internal servers and authenticated users only
            return succeed(Reply(530, "5.7.0", "Authentication required"))
        return self._run(self._request(Stage.MAIL, session, envelope), self.transaction)

    def rcpt(self, session: Session, envelope: Envelope, recipient: Recipient) -> Deferred[Reply | None]:
        refused = self.reception.relay_refusal(session, envelope, recipient)
        if refused is not None:
            return succeed(refused)
        return self._run(self._request(Stage.RCPT, session, envelope, recipient), self.transaction)

    def _record(self, outcome: Outcome, into: _Transaction, request: Request) -> None:
        into.hits.extend(outcome.hits)
        into.tags.extend(outcome.tags)
        into.copies.extend(outcome.copies)
        verdict = outcome.verdict
        recipient = request.recipient.address if request.recipient is not None else None
        action = verdict.action
        reason = verdict.reason or outcome.decided_by or action.value
        if action is Action.QUARANTINE:
            into.hold = into.hold or reason  # a message is held whole, for all its recipients
        elif action is Action.DISCARD:
            if recipient is None:
                into.discard = into.discard or reason
            else:
                into.discarded.add(recipient)
        elif action is Action.REDIRECT and verdict.target:
            if recipient is None:
                into.redirect = verdict.target
            else:
                into.redirects[recipient] = verdict.target

    # --- ETRN ----------------------------------------------------------------------

    def etrn(self, session: Session, domain: str) -> Reply:
        """An internal server's ETRN <domain> (the SMTP server checked who may)."""
        handler = self.reception.etrn
        if handler is None:
            return Reply(458, "4.3.0", f"Unable to queue messages for node {domain}")
        try:
            handler(domain)
        except Exception:
            log.failure("etrn: {domain} failed", domain=domain)
            return Reply(458, "4.3.0", f"Unable to queue messages for node {domain}")
        log.info("etrn: {domain} from [{peer}]", domain=domain, peer=session.peer_host)
        return Reply(250, "2.0.0", f"Queuing for node {domain} started")

    # --- AUTH ----------------------------------------------------------------------

    def auth_allowed(self, session: Session) -> Deferred[Reply | None]:
        """Before an AUTH exchange: a Reply refuses it (a client locked out)."""
        guards = self.reception.auth_guards
        if not guards:
            return succeed(None)
        request = self._request(Stage.MAIL, session)

        def ask(index: int) -> Deferred[Reply | None]:
            if index == len(guards):
                return succeed(None)
            answer = guards[index].auth_allowed(session)
            deferred = answer if isinstance(answer, Deferred) else succeed(answer)

            def decided(verdict: Verdict) -> Deferred[Reply | None] | Reply | None:
                reply = refusal(Outcome(verdict, getattr(guards[index], "name", "?")), request.stage)
                return reply if reply is not None else ask(index + 1)

            return deferred.addCallback(decided)

        return ask(0)

    def auth_result(self, session: Session, user: str, success: bool) -> float:
        """Note an AUTH outcome; the seconds to wait before answering it."""
        delay = 0.0
        for guard in self.reception.auth_guards:
            try:
                delay = max(delay, float(guard.auth_result(session, user, success)))
            except Exception:
                log.failure("filter: {name}: auth_result failed", name=getattr(guard, "name", "?"))
        return delay

    # --- the message ---------------------------------------------------------------

    def header_block(self) -> bytes:
        """Headers to write after our Received header: the filters' tags and hits."""
        lines: list[str] = []
        for verdict in (*self.session_level.tags, *self.transaction.tags):
            lines.extend(f"{name}: {value}" for name, value in verdict.headers)
        if self.reception.headers:
            hits = [*self.session_level.hits, *self.transaction.hits]
            if hits:
                lines.append("X-Mailgate-Filters: " + "; ".join(hit.describe() for hit in hits))
        return _header_lines(lines)

    def _data_headers(self, outcome: Outcome) -> bytes:
        """What the end-of-data stage adds: its tags, its hits, and the total score."""
        lines = [f"{name}: {value}" for verdict in outcome.tags for name, value in verdict.headers]
        if self.reception.headers:
            if outcome.hits:
                lines.append("X-Mailgate-Filters: " + "; ".join(hit.describe() for hit in outcome.hits))
            score = sum(hit.score for hit in (*self.session_level.hits, *self.transaction.hits))
            if score:
                lines.append(f"X-Mailgate-Score: {score:g}")
        return _header_lines(lines)

    def new_message(self, session: Session) -> IIncomingMessage:
        return self.reception.spool.new_message()

    def accept(self, session: Session, envelope: Envelope, message: IIncomingMessage) -> Deferred[Reply]:
        """End of data: the DATA stage, then the message as the filters want it, queued."""
        request = self._request(Stage.DATA, session, envelope, message=self.reception.content(message))

        def decided(outcome: Outcome) -> Deferred[Reply] | Reply:
            self._record(outcome, self.transaction, request)
            _log_defects(message.queue_id, request.message)
            reply = refusal(outcome, Stage.DATA)
            if reply is not None and reply.code >= 500 and request.direction is Direction.FETCHED:
                return self._fetched_refused(request, envelope, message, outcome)
            if reply is not None:
                self._tell_refused(request)
                if reply.code >= 500 and self.reception.keep_rejected:
                    return self._keep_rejected(request, envelope, message, outcome, reply)
                message.abort()
                return reply
            added = self._data_headers(outcome)
            if added:
                message.add_headers(added)
            prefix = next(
                (
                    v.subject_prefix
                    for v in (*self.session_level.tags, *self.transaction.tags)
                    if v.subject_prefix
                ),
                "",
            )
            if prefix:
                message.prefix_subject(prefix)
            return self._queue(request, envelope, message)

        return self.reception.runner.run(request).addCallback(decided)

    def _final_envelope(self, envelope: Envelope) -> tuple[Envelope, list[str]]:
        """The recipients after redirects, discards and copies; and what changed, for the log."""
        whole = (self.session_level, self.transaction)
        redirect = next((t.redirect for t in whole if t.redirect), None)
        notes: list[str] = []
        recipients: list[Recipient] = []
        seen: set[str] = set()

        def add(recipient: Recipient) -> None:
            if recipient.address.lower() not in seen:
                seen.add(recipient.address.lower())
                recipients.append(recipient)

        for recipient in envelope.rcpt_to:
            address = recipient.address
            if any(address in t.discarded for t in whole):
                notes.append(f"discarded to=<{address}>")
                continue
            target = redirect or next((t.redirects[address] for t in whole if address in t.redirects), None)
            if target is not None:
                notes.append(f"redirected to=<{address}> -> <{target}>")
                add(Recipient(target, recipient.notify, recipient.orcpt or f"rfc822;{address}"))
            else:
                add(recipient)
        for target in (*self.session_level.copies, *self.transaction.copies):
            notes.append(f"copy to <{target}>")
            add(Recipient(target))
        return attrs.evolve(envelope, rcpt_to=tuple(recipients)), notes

    def _queue(
        self, request: Request, envelope: Envelope, message: IIncomingMessage
    ) -> Deferred[Reply] | Reply:
        queue_id = message.queue_id
        discard = self.session_level.discard or self.transaction.discard
        final, notes = self._final_envelope(envelope)
        if discard is not None or (envelope.rcpt_to and not final.rcpt_to):
            message.abort()
            self._tell_refused(request)
            log.info(
                "{queue_id}: discarded: from=<{sender}> nrcpt={count}: {reason}",
                queue_id=queue_id,
                sender=envelope.mail_from,
                count=len(envelope.rcpt_to),
                reason=discard or "; ".join(notes),
            )
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")  # RFC: DISCARD pretends success
        hold = self.session_level.hold or self.transaction.hold
        hits = tuple((*self.session_level.hits, *self.transaction.hits))
        quarantine = _quarantine(hold, request.direction, hits) if hold is not None else None
        committed: Deferred[str] = message.commit(final, request.session, quarantine=quarantine)

        def queued(queue_id: str) -> Reply:
            for note in notes:
                log.info("{queue_id}: {note}", queue_id=queue_id, note=note)
            log.info(
                "{queue_id}: from=<{sender}>, size={size}, nrcpt={count} ({where})",
                queue_id=queue_id,
                sender=envelope.mail_from,
                size=message.size,
                count=len(final.rcpt_to),
                where=f"held: {hold}" if hold is not None else "queue active",
            )
            for observer in self.reception.accept_observers.get(request.direction, ()):
                try:
                    observer.message_accepted(attrs.evolve(request, envelope=final), hits, hold is not None)
                except Exception:
                    log.failure(
                        "filter: {name}: message_accepted failed", name=getattr(observer, "name", "?")
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

    def _fetched_refused(
        self, request: Request, envelope: Envelope, message: IIncomingMessage, outcome: Outcome
    ) -> Deferred[Reply] | Reply:
        """Fetched mail a filter refused: quarantined, tagged or deleted, as configured."""
        reason = outcome.verdict.reason or outcome.decided_by or "refused"
        policy = self.reception.fetched_refusal
        if policy == "delete":
            self._tell_refused(request)
            message.abort()
            log.info(
                "{queue_id}: fetched message deleted ({source}): {reason}",
                queue_id=message.queue_id,
                source=request.session.fetched_from,
                reason=reason,
            )
            return Reply(250, "2.0.0", f"Ok: deleted {message.queue_id}")
        if policy == "quarantine":
            self.transaction.hold = self.transaction.hold or f"refused: {reason}"
        else:
            message.add_headers(_header_lines([f"X-Mailgate-Refused: {reason}"]))
        added = self._data_headers(outcome)
        if added:
            message.add_headers(added)
        return self._queue(request, envelope, message)

    def _keep_rejected(
        self, request: Request, envelope: Envelope, message: IIncomingMessage, outcome: Outcome, reply: Reply
    ) -> Deferred[Reply]:
        """A copy of a refused message into the quarantine; the client gets the refusal all the same."""
        hits = tuple((*self.session_level.hits, *self.transaction.hits))
        reason = outcome.verdict.reason or outcome.decided_by or "rejected"
        quarantine = _quarantine(reason, request.direction, hits, kind="rejected")
        kept: Deferred[str] = message.commit(envelope, request.session, quarantine=quarantine)

        def done(queue_id: str) -> Reply:
            log.info(
                "{queue_id}: rejected, a copy kept in the quarantine: {reason}",
                queue_id=queue_id,
                reason=reason,
            )
            return reply

        def failed(failure: Failure) -> Reply:
            log.error(
                "{queue_id}: cannot keep a copy of the rejected message: {error}",
                queue_id=message.queue_id,
                error=failure.getErrorMessage(),
            )
            return reply

        return kept.addCallbacks(done, failed)

    def _tell_refused(self, request: Request) -> None:
        """A message was refused or discarded at its end: observers may forget its sender."""
        hits = tuple((*self.session_level.hits, *self.transaction.hits))
        for observer in self.reception.accept_observers.get(request.direction, ()):
            refused = getattr(observer, "message_refused", None)
            if refused is None:
                continue
            try:
                refused(request, hits)
            except Exception:
                log.failure("filter: {name}: message_refused failed", name=getattr(observer, "name", "?"))

    def close(self) -> None:
        """The connection is gone: filters that saw it connect are told."""
        observers, self.observers = self.observers, ()
        counts = self.counts()
        for observer in observers:
            try:
                observer.session_closed(self.session, counts)
            except Exception:
                log.failure("filter: {name}: session_closed failed", name=getattr(observer, "name", "?"))


def _quarantine(
    reason: str, direction: Direction, hits: tuple[Hit, ...], kind: str = "quarantine"
) -> Quarantine:
    return Quarantine(
        reason=reason,
        direction=direction.value,
        hits=tuple((hit.filter, hit.action.value, hit.reason, hit.score) for hit in hits),
        kind=kind,
    )


def _log_defects(queue_id: str, content: MessageContent | None) -> None:
    """One line for a malformed message the content filters read (parsed as far as it went)."""
    parsed = content.done if content is not None else None
    if parsed is not None and (parsed.defects or parsed.truncated):
        log.info(
            "{queue_id}: malformed or over a [content] limit{truncated}: {defects}",
            queue_id=queue_id,
            truncated=" (not read whole)" if parsed.truncated else "",
            defects="; ".join(parsed.defects[:10]) or "-",
        )


def _content_here(message: IIncomingMessage) -> MessageContent:
    """The DATA stage's view of a message, parsed in the caller's thread (tests, the defaults)."""
    from gateway.content.parse import parse_message

    limits = ContentLimits()
    return MessageContent(message.size, message.open, lambda raw: parse_message(raw, limits), limits)


def _header_lines(lines: list[str]) -> bytes:
    if not lines:
        return b""
    return ("\r\n".join(_one_line(line) for line in lines) + "\r\n").encode("utf-8", "replace")


def _one_line(text: str) -> str:
    """A header line with no CR/LF a filter's reason could smuggle in."""
    return text.replace("\r", " ").replace("\n", " ")[:998]
