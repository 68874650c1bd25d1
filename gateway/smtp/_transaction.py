"""The SMTP server's envelope commands: HELO/EHLO, MAIL, RCPT and RSET.

A mixin of `gateway.smtp.server.SmtpServerProtocol`. Each command that the
session checks (the filter chain) may refuse waits for their answer before the
session or the envelope changes, so a refused HELO or recipient leaves no trace.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import maybeDeferred

from gateway.model import Envelope
from gateway.smtp._conversation import OK, Conversation, describe
from gateway.smtp._session import ehlo_keywords
from gateway.smtp.address import parse_mail_from, parse_rcpt_to
from gateway.smtp.reply import Reply


class Transaction(Conversation):
    """HELO/EHLO, MAIL, RCPT, RSET: the session's greeting and the envelope."""

    def _ehlo(self, argument: str) -> Reply | None:
        return self._greet(argument, esmtp=True)

    def _helo(self, argument: str) -> Reply | None:
        return self._greet(argument, esmtp=False)

    def _greet(self, argument: str, *, esmtp: bool) -> Reply | None:
        domain = argument.strip(" ")
        verb = "EHLO" if esmtp else "HELO"
        if not domain:
            return Reply(501, "5.5.4", f"Syntax: {verb} hostname")
        if not domain.isprintable():
            return Reply(501, "5.5.2", f"Invalid {verb} hostname")
        self._reset_transaction()
        before = self.session
        session = attrs.evolve(before, helo=domain, esmtp=False)

        def checked(refusal: Reply | None) -> Reply:
            if refusal is not None and not refusal.is_positive:
                self.session = attrs.evolve(self.session, helo=before.helo, esmtp=before.esmtp)
                return refusal
            self.session = attrs.evolve(self.session, helo=domain, esmtp=esmtp)
            if not esmtp:
                return Reply(250, None, self.settings.hostname)
            keywords = ehlo_keywords(
                self.settings,
                self.session,
                can_start_tls=self._can_start_tls,
                auth_mechanisms=tuple(self._mechanisms()),
            )
            return Reply(250, None, "\n".join([self.settings.hostname, *keywords]))

        self.session = session
        self._wait(maybeDeferred(self.checks.helo, session), checked, describe(verb, argument))
        return None

    def _mail(self, argument: str) -> Reply | None:
        if self.session.helo is None:
            return Reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self.settings.tls_required and not self.session.tls:
            return Reply(530, "5.7.0", "Must issue a STARTTLS command first")
        if self._envelope is not None:
            return Reply(503, "5.5.1", "Error: nested MAIL command")
        if argument[:5].upper() != "FROM:":
            return Reply(501, "5.5.2", "Syntax: MAIL FROM:<address>")
        parsed = parse_mail_from(argument[5:], esmtp=self.session.esmtp)
        if parsed.size is not None and parsed.size > self.settings.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed limit")
        envelope = Envelope(
            mail_from=parsed.sender,
            rcpt_to=(),
            body=parsed.body,
            smtputf8=parsed.smtputf8,
            ret=parsed.ret,
            envid=parsed.envid,
            size=parsed.size,
            auth=parsed.auth,
        )

        def checked(refusal: Reply | None) -> Reply:
            if refusal is not None and not refusal.is_positive:
                return refusal
            self._envelope = envelope
            return refusal or Reply(250, "2.1.0", "Ok")

        check = maybeDeferred(self.checks.mail, self.session, envelope)
        self._wait(check, checked, describe("MAIL", argument))
        return None

    def _rcpt(self, argument: str) -> Reply | None:
        envelope = self._envelope
        if envelope is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        if argument[:3].upper() != "TO:":
            return Reply(501, "5.5.2", "Syntax: RCPT TO:<address>")
        recipient = parse_rcpt_to(argument[3:], utf8=envelope.smtputf8, esmtp=self.session.esmtp)
        if len(envelope.rcpt_to) >= self.settings.max_recipients:
            return Reply(452, "4.5.3", "Error: too many recipients")

        def checked(refusal: Reply | None) -> Reply:
            if refusal is not None and not refusal.is_positive:
                return refusal
            current = self._envelope or envelope
            self._envelope = attrs.evolve(current, rcpt_to=(*current.rcpt_to, recipient))
            self._recipients += 1
            return refusal or Reply(250, "2.1.5", "Ok")

        check = maybeDeferred(self.checks.rcpt, self.session, envelope, recipient)
        self._wait(check, checked, describe("RCPT", argument))
        return None

    def _rset(self, argument: str) -> Reply:
        if argument.strip(" "):
            return Reply(501, "5.5.4", "Syntax: RSET")
        self._rsets += 1
        self._reset_transaction()
        return OK

    def _reset_transaction(self) -> None:
        self._forget_message()
        self._envelope = None
