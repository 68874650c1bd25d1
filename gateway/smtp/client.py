"""The gateway's SMTP / LMTP client: one session with one server.

Not `twisted.mail.smtp.SMTPClient` (see the notes: R3 outbound smuggling, R7
STARTTLS response injection, no pipelining or ESMTP parameters). A
`ClientSession` wraps a connected `ClientProtocol`:

- `open()`: greeting, EHLO (HELO fallback; LHLO for LMTP), STARTTLS per the TLS
  policy (``none`` / ``may`` / ``encrypt`` / ``verify``), EHLO again, AUTH
  (PLAIN / LOGIN / CRAM-MD5, over TLS unless allowed in plaintext);
- `deliver()`: MAIL FROM with SIZE, BODY, SMTPUTF8 and DSN parameters, RCPTs and
  DATA pipelined when offered, the message streamed and dot-stuffed; one
  `Outcome` per recipient (LMTP: one end-of-data reply per accepted recipient);
- `park()` before the session goes back to a `ConnectionCache`: its RSET then
  goes out in front of the next transaction's MAIL FROM, in the same write when
  the server offers PIPELINING (Postfix, too, sends RSET to check that a cached
  session is still usable); `reset()` (RSET now), `quit()`.

A failure of the session as a whole raises `SessionFailure`, which carries the
reply (or our own reason) to apply to every recipient still waiting.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from gateway.model import Body, Envelope, Recipient, RecipientResult
from gateway.queue import open_message
from gateway.smtp._client_protocol import ClientError, ClientProtocol, MessageSender
from gateway.smtp.address import xtext_encode
from gateway.smtp.reply import Reply


class TlsPolicy(enum.Enum):
    """What a route asks of TLS (Postfix's smtp_tls_security_level)."""

    NONE = "none"  # never STARTTLS
    MAY = "may"  # STARTTLS when offered, certificate not checked; plaintext if it fails
    ENCRYPT = "encrypt"  # TLS required, certificate not checked
    VERIFY = "verify"  # TLS required, certificate and host name verified


@attrs.frozen
class ClientSettings:
    """Client timeouts (Postfix's defaults) and what every session needs."""

    helo_name: str
    connect_timeout: float = 30.0
    helo_timeout: float = 300.0  # greeting, EHLO, STARTTLS, AUTH
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_xfer_timeout: float = 180.0
    data_done_timeout: float = 600.0
    rset_timeout: float = 20.0
    quit_timeout: float = 30.0
    chunk_size: int = 64 * 1024


@attrs.frozen
class AuthCredentials:
    """SASL credentials for a smart host."""

    username: str
    password: str
    allow_plaintext: bool = False  # send them without TLS (only for a trusted network)


@attrs.frozen
class Outcome:
    """One recipient's result, and whether another server may be tried for it."""

    result: RecipientResult
    failover: bool  # transient, and nothing was handed over: worth another host


class SessionFailure(Exception):
    """The session failed as a whole; every waiting recipient gets this result."""

    def __init__(
        self,
        code: int,
        enhanced: str | None,
        text: str,
        relay: str,
        *,
        failover: bool = True,
        tls_failed: bool = False,
        before_mail: bool = False,
    ) -> None:
        super().__init__(f"{code} {enhanced or ''} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.relay = relay
        self.failover = failover
        self.tls_failed = tls_failed
        self.before_mail = before_mail  # nothing of this transaction got a reply yet

    @classmethod
    def from_error(cls, error: ClientError, relay: str, *, before_mail: bool = False) -> SessionFailure:
        return cls(
            451, error.enhanced, error.text, relay, tls_failed=error.tls_failed, before_mail=before_mail
        )

    def result(self, recipient: Recipient) -> RecipientResult:
        return RecipientResult(recipient, self.code, self.enhanced, self.text, self.relay)


def _said(peer: str, reply: Reply, command: str) -> str:
    """Postfix's "host X said: 550 ... (in reply to RCPT TO command)"."""
    return f"host {peer} said: {reply} (in reply to {command} command)"


class ClientSession:
    """One SMTP or LMTP session over a connected `ClientProtocol`."""

    def __init__(
        self,
        protocol: ClientProtocol,
        settings: ClientSettings,
        relay: str,
        *,
        lmtp: bool = False,
        created: float = 0.0,
    ) -> None:
        self.protocol = protocol
        self.settings = settings
        self.relay = relay  # "mx.example.com[192.0.2.1]:25"
        self.lmtp = lmtp
        self.created = created
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> its parameters
        self.esmtp = False
        self.tls = False
        self.authenticated = False
        self.transactions = 0
        self.rset_pending = False  # parked: RSET before the next MAIL FROM

    # -- session set-up ---------------------------------------------------------------

    async def open(
        self,
        tls_policy: TlsPolicy = TlsPolicy.MAY,
        tls_options: object = None,
        credentials: AuthCredentials | None = None,
    ) -> None:
        """Greeting, EHLO, STARTTLS and AUTH as the policy says; raises SessionFailure."""
        try:
            greeting = await self.protocol.greeting
            if not greeting.is_positive:
                raise self._refused(
                    greeting, "the initial server greeting", "host {} refused to talk to me: {}"
                )
            await self._hello()
            if tls_policy is not TlsPolicy.NONE:
                await self._starttls(tls_policy, tls_options)
            if credentials is not None:
                await self._authenticate(credentials)
        except ClientError as error:
            self.protocol.abort()
            raise SessionFailure.from_error(error, self.relay) from None
        except SessionFailure:
            self.quit()
            raise

    def _refused(self, reply: Reply, what: str, template: str = "") -> SessionFailure:
        text = template.format(self.relay, reply) if template else _said(self.relay, reply, what)
        return SessionFailure(reply.code if reply.code >= 400 else 451, reply.enhanced, text, self.relay)

    async def _hello(self) -> None:
        timeout = self.settings.helo_timeout
        name = self.settings.helo_name.encode("ascii")
        if self.lmtp:
            reply = await self.protocol.command(b"LHLO " + name, "receiving the LHLO response", timeout)
            if not reply.is_positive:
                raise self._refused(reply, "LHLO")
        else:
            reply = await self.protocol.command(b"EHLO " + name, "receiving the EHLO response", timeout)
            if reply.is_permanent:  # a server from before 1995: HELO, no extensions
                reply = await self.protocol.command(b"HELO " + name, "receiving the HELO response", timeout)
                if not reply.is_positive:
                    raise self._refused(reply, "HELO")
                self.esmtp = False
                self.extensions = {}
                return
            if not reply.is_positive:
                raise self._refused(reply, "EHLO")
        self.esmtp = True
        self.extensions = {}
        for line in reply.lines()[1:]:
            keyword, _, parameters = line.strip().partition(" ")
            if keyword:
                self.extensions[keyword.upper()] = parameters.strip()

    async def _starttls(self, policy: TlsPolicy, options: object) -> None:
        required = policy in (TlsPolicy.ENCRYPT, TlsPolicy.VERIFY)
        if "STARTTLS" not in self.extensions or options is None:
            if required:
                raise SessionFailure(
                    451, "4.7.4", f"TLS is required, but was not offered by host {self.relay}", self.relay
                )
            return
        reply = await self.protocol.starttls(options, self.settings.helo_timeout)
        if reply.code != 220:
            if required:
                raise SessionFailure(
                    451 if reply.code < 500 else reply.code,
                    "4.7.5" if reply.code < 500 else "5.7.5",
                    f"TLS is required, but host {self.relay} refused to start TLS: {reply}",
                    self.relay,
                )
            return  # opportunistic: carry on in plaintext, as Postfix does
        self.tls = True
        await self._hello()  # RFC 3207 4.2: forget what was said before TLS

    async def _authenticate(self, credentials: AuthCredentials) -> None:
        offered = self.extensions.get("AUTH", "").upper().split()
        if not offered:
            return  # nothing to log in to: send as we are, like Postfix
        if not self.tls and not credentials.allow_plaintext:
            raise SessionFailure(
                451,
                "4.7.0",
                f"not sending credentials to {self.relay} over a connection without TLS",
                self.relay,
            )
        order = ("PLAIN", "LOGIN", "CRAM-MD5") if self.tls else ("CRAM-MD5", "PLAIN", "LOGIN")
        mechanism = next((m for m in order if m in offered), None)
        if mechanism is None:
            raise SessionFailure(
                451,
                "4.7.0",
                f"no SASL mechanism in common with {self.relay} (it offers {' '.join(offered)})",
                self.relay,
            )
        reply = await self._sasl(mechanism, credentials)
        if reply.code != 235:
            raise SessionFailure(  # a soft bounce, as Postfix's smtp_sasl_auth_soft_bounce
                451,
                "4.7.0",
                f"SASL authentication failed; server {self.relay} said: {reply}",
                self.relay,
            )
        self.authenticated = True

    async def _sasl(self, mechanism: str, credentials: AuthCredentials) -> Reply:
        timeout = self.settings.helo_timeout
        stage = "receiving the AUTH response"
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        command = self.protocol.command
        if mechanism == "PLAIN":
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            return await command(b"AUTH PLAIN " + token, stage, timeout)
        if mechanism == "LOGIN":
            reply = await command(b"AUTH LOGIN", stage, timeout)
            if reply.code == 334:
                reply = await command(base64.b64encode(user), stage, timeout)
            if reply.code == 334:
                reply = await command(base64.b64encode(password), stage, timeout)
            return await self._end_sasl(reply)
        reply = await command(b"AUTH CRAM-MD5", stage, timeout)
        if reply.code == 334:
            try:
                challenge = base64.b64decode(reply.text.strip(), validate=True)
            except ValueError:
                return await self._end_sasl(Reply(501, None, "bad CRAM-MD5 challenge"))
            digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode("ascii")
            reply = await command(base64.b64encode(user + b" " + digest), stage, timeout)
        return await self._end_sasl(reply)

    async def _end_sasl(self, reply: Reply) -> Reply:
        if reply.code == 334:  # the server wants more than we know: cancel (RFC 4954 4)
            await self.protocol.command(b"*", "receiving the AUTH response", self.settings.helo_timeout)
        return reply

    # -- one transaction --------------------------------------------------------------

    async def deliver(
        self, envelope: Envelope, recipients: Sequence[Recipient], message_path: str, size: int
    ) -> list[Outcome]:
        """One mail transaction; raises SessionFailure if the connection breaks before
        any recipient had its answer. Afterwards, `reset()` or `quit()`."""
        refusal = self._refuse_early(envelope, size)
        if refusal is not None:
            return [Outcome(refusal.result(r), failover=False) for r in recipients]
        self.transactions += 1
        try:
            return await self._transaction(envelope, recipients, message_path, size)
        except ClientError as error:
            self.protocol.abort()
            raise SessionFailure.from_error(error, self.relay) from None

    def _refuse_early(self, envelope: Envelope, size: int) -> SessionFailure | None:
        if envelope.smtputf8 and "SMTPUTF8" not in self.extensions:
            return SessionFailure(
                550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.relay}", self.relay
            )
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and size > int(limit):
            return SessionFailure(
                552,
                "5.3.4",
                f"message size {size} exceeds size limit {limit} of server {self.relay}",
                self.relay,
            )
        return None

    def _mail_command(self, envelope: Envelope, size: int) -> bytes:
        parts = [f"MAIL FROM:<{envelope.mail_from}>"]
        if "SIZE" in self.extensions:
            parts.append(f"SIZE={size}")
        if envelope.body is not Body.SEVEN_BIT and "8BITMIME" in self.extensions:
            parts.append("BODY=8BITMIME")  # BINARYMIME would need BDAT; 8BITMIME carries it over DATA
        if envelope.smtputf8:
            parts.append("SMTPUTF8")
        if "DSN" in self.extensions:
            if envelope.ret is not None:
                parts.append(f"RET={envelope.ret.value}")
            if envelope.envid is not None:
                parts.append(f"ENVID={xtext_encode(envelope.envid)}")
        return " ".join(parts).encode("utf-8")

    def _rcpt_command(self, recipient: Recipient) -> bytes:
        parts = [f"RCPT TO:<{recipient.address}>"]
        if "DSN" in self.extensions:
            if recipient.notify:
                parts.append("NOTIFY=" + ",".join(sorted(n.value for n in recipient.notify)))
            if recipient.orcpt and ";" in recipient.orcpt:
                kind, _, address = recipient.orcpt.partition(";")
                parts.append(f"ORCPT={kind};{xtext_encode(address)}")
        return " ".join(parts).encode("utf-8")

    async def _transaction(
        self, envelope: Envelope, recipients: Sequence[Recipient], message_path: str, size: int
    ) -> list[Outcome]:
        settings = self.settings
        results: dict[int, Outcome] = {}
        bad = [i for i, r in enumerate(recipients) if _unsafe(r.address)]
        for i in bad:
            text = f"bad recipient address syntax: {recipients[i].address!r}"
            results[i] = Outcome(RecipientResult(recipients[i], 553, "5.1.3", text, "none"), False)
        if _unsafe(envelope.mail_from):
            failure = SessionFailure(553, "5.1.7", "bad sender address syntax", "none", failover=False)
            return [Outcome(failure.result(r), False) for r in recipients]
        sending = [i for i in range(len(recipients)) if i not in results]
        mail = self._mail_command(envelope, size)
        commands = [(mail, "receiving the MAIL FROM response", settings.mail_timeout)]
        for i in sending:
            commands.append(
                (self._rcpt_command(recipients[i]), "receiving the RCPT TO response", settings.rcpt_timeout)
            )
        pipelining = "PIPELINING" in self.extensions
        rset, self.rset_pending = self.rset_pending, False
        if rset and not pipelining:
            self._check_rset(await self.protocol.command(*_rset_command(settings)))
        if pipelining:
            commands.append((b"DATA", "receiving the DATA response", settings.data_init_timeout))
            if rset:
                commands.insert(0, _rset_command(settings))
            replies = await self.protocol.send_batch(commands)
            if rset:
                self._check_rset(replies[0])
                replies = replies[1:]
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await self.protocol.command(*commands[0])
            rcpt_replies = []
            if mail_reply.is_positive:
                for command in commands[1:]:
                    rcpt_replies.append(await self.protocol.command(*command))
            data_reply = None
        if not mail_reply.is_positive:
            if data_reply is not None and data_reply.code == 354:
                await self._end_empty_data()
            failure = self._refused(mail_reply, "MAIL FROM")
            failure.failover = mail_reply.is_transient
            for i in sending:
                results[i] = Outcome(failure.result(recipients[i]), failure.failover)
            return [results[i] for i in range(len(recipients))]
        accepted: list[int] = []
        for i, reply in zip(sending, rcpt_replies, strict=True):
            if reply.is_positive:
                accepted.append(i)
            else:
                text = _said(self.relay, reply, "RCPT TO")
                result = RecipientResult(recipients[i], reply.code, reply.enhanced, text, self.relay)
                results[i] = Outcome(result, reply.is_transient)
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                await self._end_empty_data()
            return [results[i] for i in range(len(recipients))]
        if data_reply is None:
            data_reply = await self.protocol.command(
                b"DATA", "receiving the DATA response", settings.data_init_timeout
            )
        if data_reply.code != 354:
            for i in accepted:
                result = RecipientResult(
                    recipients[i],
                    data_reply.code,
                    data_reply.enhanced,
                    _said(self.relay, data_reply, "DATA"),
                    self.relay,
                )
                results[i] = Outcome(result, data_reply.is_transient)
            return [results[i] for i in range(len(recipients))]
        try:
            message = open_message(message_path)  # closed by the sender
        except OSError as error:
            raise ClientError(f"cannot read the queued message: {error}", "4.3.0") from None
        await MessageSender(self.protocol, message, settings.chunk_size, settings.data_xfer_timeout).start()
        stage = "receiving the end of data response"
        count = len(accepted) if self.lmtp else 1
        try:
            if count == 1:
                final = [await self.protocol.expect(stage, settings.data_done_timeout)]
            else:
                final = await self.protocol.expect_batch(stage, settings.data_done_timeout, count)
        except ClientError as error:
            # the message was sent; it may have been taken: no other host this round
            error_failure = SessionFailure.from_error(error, self.relay)
            for i in accepted:
                results[i] = Outcome(error_failure.result(recipients[i]), False)
            for i in range(len(recipients)):
                results.setdefault(i, Outcome(error_failure.result(recipients[i]), False))
            self.protocol.abort()
            return [results[i] for i in range(len(recipients))]
        for n, i in enumerate(accepted):
            reply = final[n] if self.lmtp else final[0]
            text = _said(self.relay, reply, "end of DATA")
            if reply.is_positive:
                text = str(reply)  # "250 2.0.0 Ok: queued as ..." (the relay is logged beside it)
            results[i] = Outcome(
                RecipientResult(recipients[i], reply.code, reply.enhanced, text, self.relay), False
            )
        return [results[i] for i in range(len(recipients))]

    async def _end_empty_data(self) -> None:
        # RFC 2920 3.1: a 354 with no recipient accepted; end the (empty) message at once
        assert self.protocol.transport is not None
        self.protocol.transport.write(b".\r\n")
        await self.protocol.expect("receiving the end of data response", self.settings.data_done_timeout)

    def _check_rset(self, reply: Reply) -> None:
        """A refused RSET: the session is not fit for another transaction (nothing is sent)."""
        if reply.is_positive:
            return
        self.protocol.abort()  # not QUIT: a pipelined DATA may have had its 354
        raise SessionFailure(451, "4.4.2", _said(self.relay, reply, "RSET"), self.relay)

    # -- after a transaction ------------------------------------------------------------

    def park(self) -> bool:
        """After a transaction; True if the session can carry another (RSET goes with it)."""
        if not self.usable:
            return False
        self.rset_pending = True
        return True

    def reset(self) -> Deferred[bool]:
        """RSET; fires with True if the session can carry another transaction."""
        if self.protocol.closed or self.protocol.busy:
            return succeed(False)
        reply = self.protocol.command(b"RSET", "receiving the RSET response", self.settings.rset_timeout)
        return reply.addCallbacks(self._reset_reply, _reset_failed)

    def _reset_reply(self, reply: Reply) -> bool:
        if not reply.is_positive:
            self.quit()
            return False
        return True

    def quit(self) -> Deferred[None]:
        """QUIT and close after the answer (or `quit_timeout`); fires once closed."""
        if self.protocol.closed:
            return self.protocol.when_closed()
        if self.protocol.busy:  # mid-transaction: nothing sensible to say
            self.protocol.abort()
            return self.protocol.when_closed()
        reply = self.protocol.command(b"QUIT", "receiving the QUIT response", self.settings.quit_timeout)
        reply.addErrback(lambda _failure: None)
        reply.addBoth(lambda _result: self.protocol.close())
        return self.protocol.when_closed()

    def abort(self) -> None:
        self.protocol.abort()

    @property
    def usable(self) -> bool:
        return not self.protocol.closed and not self.protocol.busy


def _rset_command(settings: ClientSettings) -> tuple[bytes, str, float]:
    return (b"RSET", "receiving the RSET response", settings.rset_timeout)


def _unsafe(address: str) -> bool:
    return any(c in address for c in "\r\n\0<>") or any(ord(c) < 32 for c in address)


def _reset_failed(failure: Failure) -> bool:
    failure.trap(ClientError)  # type: ignore[no-untyped-call]
    return False
