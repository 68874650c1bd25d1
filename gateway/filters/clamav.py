"""ClamAV ("clamav"): each message, or each of its attachments, is scanned by clamd.

At the end of DATA the content is streamed to clamd (`gateway.scanners.clamd`,
INSTREAM) — with `scope` "message" the raw message as received (clamd reads the
MIME structure itself), with "attachments" each attachment of the shared parse
(`request.message.parsed()`), decoded, one stream each, the text left out.

What is found is acted on by `action`:

- "reject" (the default): ``554 5.7.1 Virus found: <name>`` at the end of DATA;
- "quarantine": the message is held (QUARANTINE; the reason begins ``virus:``);
- "discard": accepted and dropped.

Whatever the action, a notice goes to each audience in `notify` ("postmaster"
by default; "sender" and "recipients" on request — never to the null sender, and
note that viruses forge their senders) through the gateway's outbox, from the
null sender: the virus, what was done, the envelope, the client and the Subject
(the message has no queue id: it is not queued, or not yet). Each detection is
counted by name in the state store (table "virus") and logged on one line.

Content clamd will not scan — larger than `max_size` (25 MB, clamd's own
StreamMaxLength default), refused by clamd as over its StreamMaxLength, or (scope
"attachments") cut short by the parse's limits — is unscanned. `too_large`
decides: "fail" (the default) fails the check, so the chain runner applies the
filter's ``on_failure`` verdict (DEFER by default); "continue" lets it pass with an
``X-Mailgate-ClamAV: not scanned (...)`` header (TAG) and a log line. clamd
unreachable, too slow or answering nonsense always fails the check: never clean.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, Action, Stage, Verdict
from gateway.scanners import ScannerTooLarge
from gateway.scanners._connection import client_endpoint
from gateway.scanners.clamd import ClamdClient, ClamdResult

log = Logger(namespace="mailgate.filter.clamav")

SCOPES = ("message", "attachments")
ACTIONS = ("reject", "quarantine", "discard")
AUDIENCES = ("postmaster", "sender", "recipients")
TOO_LARGE = ("fail", "continue")
VIRUS_TABLE = "virus"
HEADER = "X-Mailgate-ClamAV"
_HEAD_BYTES = 64 * 1024  # enough of the message to read its Subject for a notice


@attrs.frozen
class Finding:
    """What a scan found: the virus, and where ("the message", "attachment \"x.zip\"")."""

    virus: str
    where: str


class Unscanned(Exception):
    """Some content was not scanned (too large, or the parse stopped at a limit)."""


@implementer(IFilter)
class ClamAV:
    """Scans messages or attachments with clamd; rejects, holds or drops what is infected."""

    name = "clamav"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        client: Any,
        *,
        store: Any = None,
        outbox: Any = None,
        clock: Any = None,
        hostname: str = "localhost",
        scope: str = "message",
        action: str = "reject",
        notify: tuple[str, ...] = ("postmaster",),
        max_size: int = 25 * 1024 * 1024,
        too_large: str = "fail",
    ) -> None:
        """`client` is a ClamdClient; `store` and `outbox` are callables returning the state store
        and the IOutbox (looked up at the first detection, as FilterServices opens them lazily)."""
        self.client = client
        self._store = store
        self._outbox = outbox
        self.clock = clock
        self.hostname = hostname
        self.scope = scope
        self.action = action
        self.notify = notify
        self.max_size = max_size
        self.too_large = too_large
        self.viruses: dict[str, int] = {}  # found since start, by name: `mailgatectl status` shows them

    def details(self) -> dict[str, int]:
        """Counts for `mailgatectl status` beside the chain's own (viruses by name, since start)."""
        return dict(self.viruses)

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> ClamAV:
        server = options.take("server", str, "unix:/var/run/clamav/clamd.ctl")
        max_connections = options.positive("max_connections", 10)
        connect_timeout = options.positive_duration("connect_timeout", 5)
        scan_timeout = options.positive_duration("scan_timeout", 20)
        scope = options.choice("scope", SCOPES, "message")
        action = options.choice("action", ACTIONS, "reject")
        notify = options.strings("notify", ("postmaster",))
        for audience in notify:
            if audience not in AUDIENCES:
                raise options.error("notify", f"{audience!r} is not one of {', '.join(AUDIENCES)}")
        max_size = options.size("max_size", 25 * 1024 * 1024)
        if max_size < 1:
            raise options.error("max_size", "must be at least 1 byte")
        too_large = options.choice("too_large", TOO_LARGE, "fail")
        try:
            endpoint = client_endpoint(services.reactor, server)
        except ValueError as error:
            raise options.error("server", str(error)) from None
        client = ClamdClient(
            endpoint,
            services.reactor,
            address=server,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            timeout=scan_timeout,
        )
        return cls(
            client,
            store=lambda: services.store,
            outbox=lambda: services.outbox,
            clock=services.reactor,
            hostname=services.hostname,
            scope=scope,
            action=action,
            notify=tuple(dict.fromkeys(notify)),
            max_size=max_size,
            too_large=too_large,
        )

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        if request.message is None:
            return CONTINUE
        return ensureDeferred(self._check(request))

    async def _check(self, request: Request) -> Verdict:
        try:
            finding = await (
                self._scan_message(request) if self.scope == "message" else self._scan_parts(request)
            )
        except Unscanned as unscanned:
            return self._unscanned(request, str(unscanned))
        if finding is None:
            return CONTINUE
        return self._infected(request, finding)

    async def _scan_message(self, request: Request) -> Finding | None:
        content = request.message
        assert content is not None
        if content.size > self.max_size:
            raise Unscanned(f"message of {content.size} bytes is larger than max_size {self.max_size}")
        result = await self._scan(self.client.scan_stream(content.open()))
        return Finding(result.virus, "the message") if result.virus else None

    async def _scan_parts(self, request: Request) -> Finding | None:
        assert request.message is not None
        parsed = await request.message.parsed()
        if parsed.truncated:
            raise Unscanned("the parse stopped at a limit of [content], attachments may be missing")
        for attachment in parsed.attachments:
            name = f'attachment "{attachment.filename}"' if attachment.filename else "an attachment"
            if attachment.size > self.max_size:
                raise Unscanned(f"{name} of {attachment.size} bytes is larger than max_size {self.max_size}")
            result = await self._scan(self.client.scan(attachment.payload))
            if result.virus:
                return Finding(result.virus, f"{name} ({attachment.content_type})")
        return None

    async def _scan(self, scanning: Deferred[ClamdResult]) -> ClamdResult:
        try:
            return await scanning
        except ScannerTooLarge as error:
            raise Unscanned(str(error)) from None

    def _unscanned(self, request: Request, problem: str) -> Verdict:
        log.warn(
            "clamav: not scanned: {problem} from=<{sender}> [{peer}]; too_large={policy}",
            problem=problem,
            sender=_sender(request),
            peer=request.session.peer_host,
            policy=self.too_large,
        )
        if self.too_large == "fail":
            raise ScannerTooLarge(f"clamav: not scanned: {problem}")
        return Verdict(Action.TAG, f"not scanned: {problem}", headers=((HEADER, f"not scanned ({problem})"),))

    def _infected(self, request: Request, finding: Finding) -> Verdict:
        envelope = request.envelope
        log.warn(
            "clamav: virus {virus} in {where} from=<{sender}> to={recipients} [{peer}]; action={action}",
            virus=finding.virus,
            where=finding.where,
            sender=_sender(request),
            recipients=",".join(f"<{r.address}>" for r in envelope.rcpt_to) if envelope else "",
            peer=request.session.peer_host,
            action=self.action,
        )
        self._count(finding.virus)
        self._send_notices(request, finding)
        if self.action == "reject":
            return Verdict.reject(f"Virus found: {_printable(finding.virus)}")
        kind = Action.QUARANTINE if self.action == "quarantine" else Action.DISCARD
        return Verdict(kind, f"virus: {finding.virus} in {finding.where}")

    def _count(self, virus: str) -> None:
        """Virus statistics by name; a store that fails is logged, the verdict stands."""
        self.viruses[virus] = self.viruses.get(virus, 0) + 1
        if self._store is None:
            return
        try:
            counted: Deferred[int] = self._store().increment(VIRUS_TABLE, virus)
        except Exception:
            log.failure("clamav: cannot count virus {virus}", virus=virus)
            return
        counted.addErrback(
            lambda failure: log.failure("clamav: cannot count virus {virus}", failure, virus=virus)
        )

    def _send_notices(self, request: Request, finding: Finding) -> None:
        """Notices through the outbox; one that cannot be sent is logged, the verdict stands."""
        if not self.notify or self._outbox is None:
            return
        try:
            outbox = self._outbox()
        except Exception:
            log.failure("clamav: no outbox for virus notices")
            return
        text = self._notice_text(request, finding)
        for audience in self.notify:
            rcpt_to = self._audience(outbox, request, audience)
            if not rcpt_to:
                continue
            message = self._notice(rcpt_to, finding, text)
            try:
                sent: Deferred[str] = outbox.send("", rcpt_to, message)
            except Exception:
                log.failure("clamav: cannot send the virus notice to {audience}", audience=audience)
                continue
            sent.addErrback(_notice_failed, audience)

    def _audience(self, outbox: Any, request: Request, audience: str) -> tuple[str, ...]:
        envelope = request.envelope
        if audience == "postmaster":
            return (str(outbox.postmaster),)
        if envelope is None:
            return ()
        if audience == "sender":
            return (envelope.mail_from,) if envelope.mail_from else ()  # never to the null sender
        return tuple(recipient.address for recipient in envelope.rcpt_to)

    def _notice_text(self, request: Request, finding: Finding) -> str:
        envelope = request.envelope
        session = request.session
        done = {
            "reject": "refused it (554 5.7.1); it was not delivered",
            "quarantine": "held it in the virus quarantine; it was not delivered",
            "discard": "deleted it; it was not delivered",
        }[self.action]
        client = f"[{session.peer_host}]" + (f" (HELO {session.helo})" if session.helo else "")
        recipients = ", ".join(f"<{r.address}>" for r in envelope.rcpt_to) if envelope else ""
        size = request.message.size if request.message is not None else 0
        lines = [
            f"The mail gateway {self.hostname} found a virus in a message and {done}.",
            "",
            f"Virus:      {_printable(finding.virus)}",
            f"Found in:   {_printable(finding.where)}",
            f"Sender:     <{_printable(envelope.mail_from) if envelope else ''}>",
            f"Recipients: {_printable(recipients)}",
            f"Client:     {_printable(client)}",
            f"Subject:    {_printable(_subject(request))}",
            f"Size:       {size} bytes",
        ]
        return "\r\n".join(lines) + "\r\n"

    def _notice(self, rcpt_to: tuple[str, ...], finding: Finding, text: str) -> bytes:
        now = self.clock.seconds() if self.clock is not None else None
        head = [
            f"From: Mail gateway <MAILER-DAEMON@{self.hostname}>",
            "To: " + _printable(", ".join(f"<{address}>" for address in rcpt_to), 900),
            f"Subject: Virus found: {_printable(finding.virus)}",
            f"Date: {email.utils.formatdate(now, localtime=False)}",
            f"Message-ID: {email.utils.make_msgid('virus', domain=self.hostname)}",
            "Auto-Submitted: auto-generated",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        return ("\r\n".join(head) + "\r\n\r\n" + text).encode("utf-8", "replace")


def _notice_failed(failure: Failure, audience: str) -> None:
    log.failure("clamav: cannot send the virus notice to {audience}", failure, audience=audience)


def _subject(request: Request) -> str:
    """The message's Subject, read from its head (the parse may not have been made)."""
    if request.message is None:
        return ""
    try:
        head = request.message.read(_HEAD_BYTES)
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        return str(parsed.get("Subject", ""))
    except Exception:  # a hostile header is no reason to lose the notice
        return "(unreadable)"


def _sender(request: Request) -> str:
    return request.envelope.mail_from if request.envelope is not None else ""


def _printable(text: str, limit: int = 300) -> str:
    """One line of text from the outside, safe in a notice (no control characters, bounded)."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


def _positive_duration(options: Section, key: str, default: float) -> float:
    value = options.duration(key, default)
    if value <= 0:
        raise options.error(key, "must be longer than 0 s")
    return value
