"""The gateway's SMTP server: a protocol on a Twisted transport, and its factory.

One `SmtpServerProtocol` per connection. It reads into one bounded buffer and works
through it in order; whenever it asks the `Reception` something (MAIL, RCPT, end of
data) it stops reading commands until the answer comes, so pipelined commands are
answered strictly in order and nothing is lost or doubled (RFC 2920). Message data
goes to the spool in large chunks as it arrives (`gateway.smtp._data`).

Security choices (each has a regression test named after the attack):

- bytes pipelined after STARTTLS are thrown away (CVE-2011-0411), and the session
  goes back to its pre-EHLO state after the handshake (RFC 3207 4.2);
- an over-long command line is answered once and skipped, never buffered;
- only CRLF.CRLF ends DATA; bare CR / LF are refused or made CRLF (smuggling);
- any failure of the reception is a 4xx (``451 4.3.0``), never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.model import Body, Envelope, Role, Session
from gateway.smtp import _sasl
from gateway.smtp._data import DotReader, HeaderScanner, HeaderStripper, NewlineChecker, normalize_newlines
from gateway.smtp._session import (
    NO_CHECKS,
    IncomingMessage,
    Network,
    Reception,
    ServerSettings,
    SessionChecks,
    ehlo_keywords,
    in_networks,
    received_header,
)
from gateway.smtp.address import CommandError, parse_mail_from, parse_rcpt_to
from gateway.smtp.auth import ICredentials
from gateway.smtp.reply import Reply

if TYPE_CHECKING:
    from gateway.config import Config, ListenerConfig

__all__ = ["ServerSettings", "SmtpServerFactory", "SmtpServerProtocol"]

log = Logger(namespace="mailgate.smtpd")
T = TypeVar("T")

OK = Reply(250, "2.0.0", "Ok")
TEMPORARY = Reply(451, "4.3.0", "Temporary failure, please try again later")
_BDAT = re.compile(r"([0-9]{1,20})( +LAST)? *\Z", re.IGNORECASE)
# HTTP and POP3 through an SMTP port: a proxy abuse or a confused client; hang up
_FORBIDDEN = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "USER", "PASS"})
_HELP = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS AUTH"


class _Mode:
    COMMAND = "command"
    AUTH = "auth"  # waiting for a SASL response line
    DATA = "data"
    BDAT = "bdat"


class SmtpServerFactory(ServerFactory):
    """Builds one `SmtpServerProtocol` per connection for one listener."""

    def __init__(
        self,
        settings: ServerSettings,
        reception: Reception,
        *,
        clock: IReactorTime,
        tls_context: IOpenSSLServerConnectionCreator | None = None,
        credentials: ICredentials | None = None,
        relay_networks: tuple[Network, ...] = (),
        listener: str = "",
        role: Role = Role.INBOUND,
    ) -> None:
        self.settings = settings
        self.reception = reception
        self.clock = clock
        self.tls_context = tls_context
        self.credentials = credentials
        self.relay_networks = relay_networks
        self.listener = listener
        self.role = role

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        listener: ListenerConfig,
        reception: Reception,
        *,
        reactor: IReactorTime,
        tls_context: IOpenSSLServerConnectionCreator | None = None,
        credentials: ICredentials | None = None,
    ) -> SmtpServerFactory:
        """The factory for one configured listener (for the composition root)."""
        smtp = cfg.smtp
        settings = ServerSettings(
            hostname=cfg.gateway.hostname,
            banner=smtp.banner,
            max_recipients=smtp.max_recipients,
            max_message_size=smtp.max_message_size,
            max_hops=smtp.max_hops,
            idle_timeout=smtp.idle_timeout,
            max_commands=smtp.max_commands,
            max_errors=smtp.max_errors,
            soft_error_limit=smtp.soft_error_limit,
            error_delay=smtp.error_delay,
            vrfy_enabled=smtp.vrfy,
            reject_bare_lf=smtp.reject_bare_lf,
            auth_requires_tls=smtp.auth_requires_tls,
            tls_required=listener.require_tls,
        )
        return cls(
            settings,
            reception,
            clock=reactor,
            tls_context=tls_context,
            credentials=credentials,
            relay_networks=cfg.relay.networks,
            listener=listener.endpoint,
            role=listener.role,
        )

    def buildProtocol(self, addr: IAddress | None) -> SmtpServerProtocol:
        return SmtpServerProtocol(self)


@implementer(IHandshakeListener)
class SmtpServerProtocol(Protocol):
    """One SMTP connection: the command loop, DATA/BDAT reading, STARTTLS, AUTH."""

    def __init__(self, factory: SmtpServerFactory) -> None:
        self.server = factory
        self.settings = factory.settings
        self.session = Session(peer_host="unknown")
        self._buffer = bytearray()
        self._pos = 0  # what of _buffer is consumed
        self._mode = _Mode.COMMAND
        self._waiting = False  # a Deferred from the reception is pending
        self._processing = False
        self._closing = False
        self._discarding_line = False
        self._producer_paused = False
        self._timer: IDelayedCall | None = None
        self._relay_at_connect = False
        self._can_start_tls = False
        self._greeted = False  # our banner has gone out
        self._wait_number = 0
        self._tarpit: IDelayedCall | None = None
        self.checks: SessionChecks = NO_CHECKS
        # the transaction
        self._envelope: Envelope | None = None
        self._message: IncomingMessage | None = None  # ours until handed to accept()
        self._failure: Reply | None = None  # the transaction failed; say so at its end
        self._size = 0
        self._reader = DotReader(self.settings.data_chunk_size)
        self._newlines = NewlineChecker()
        self._headers = HeaderScanner()
        self._stripper: HeaderStripper | None = None  # forged X-Mailgate-* fields out (Internet mail)
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error: Reply | None = None
        self._carry = b""  # a CR at the end of a BDAT chunk, until the next byte
        self._queue_id_kept = ""  # of an aborted or handed-over message, for the log
        self._mechanism: _sasl.Plain | _sasl.Login | _sasl.CramMd5 | None = None
        # counters for limits and the disconnect log line
        self._commands = 0
        self._errors = 0
        self._messages = 0
        self._recipients = 0
        self._rsets = 0
        self._auth_failures = 0
        self._handlers: dict[str, Callable[[str], Reply | None]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "BDAT": self._bdat,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "HELP": self._help,
            "VRFY": self._vrfy,
            "EXPN": self._expn,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
        }

    # --- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = str(getattr(peer, "host", "unknown"))
        port = int(getattr(peer, "port", 0))
        self._relay_at_connect = in_networks(host, self.server.relay_networks)
        self.session = Session(
            peer_host=host,
            peer_port=port,
            listener=self.server.listener,
            role=self.server.role,
            may_relay=self._relay_at_connect,
        )
        self._can_start_tls = self.server.tls_context is not None and ITLSTransport.providedBy(self.transport)
        log.info("smtpd: connect from [{peer}]:{port}", peer=host, port=port)
        self._timer = self.server.clock.callLater(self.settings.idle_timeout, self._timed_out)
        self.checks = self.server.reception.open_session(self.session, self.counts)
        self._waiting = True  # nothing is read as a command before the banner
        check = maybeDeferred(self.checks.connect, self.session)
        check.addErrback(self._check_failed, "CONNECT").addCallback(self._greet_client)

    def counts(self) -> dict[str, int]:
        """The session's numbers so far, for the filters and the disconnect log."""
        return {
            "commands": self._commands,
            "errors": self._errors,
            "messages": self._messages,
            "recipients": self._recipients,
            "rset": self._rsets,
        }

    def _check_failed(self, failure: Failure, command: str) -> Reply:
        log.failure(
            "smtpd: {command} from [{peer}]: the check failed",
            failure,
            command=command,
            peer=self.session.peer_host,
        )
        return Reply(421, "4.3.0", f"{self.settings.hostname} Temporary failure, try again later")

    def _greet_client(self, refusal: Reply | None) -> None:
        """The connect stage is over: the banner, or the refusal and goodbye."""
        self._waiting = False
        if self._closing:
            return
        if refusal is not None:
            self._errors += 1
            self._log_reject("CONNECT", refusal)
            self._shutdown(refusal)
            return
        self._greeted = True
        self._write(Reply(220, None, f"{self.settings.hostname} {self.settings.banner}"))
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        for timer in (self._timer, self._tarpit):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._tarpit = None
        self.checks.close()
        if self._message is not None:
            self._abort_message(keep_id=True)
            log.info(
                "smtpd: {queue_id}: lost connection with [{peer}]:{port} during {mode}",
                queue_id=self._queue_id(),
                peer=self.session.peer_host,
                port=self.session.peer_port,
                mode=self._mode.upper(),
            )
        log.info(
            "smtpd: disconnect from [{peer}]:{port} commands={commands} messages={messages}"
            " rcpt={recipients} errors={errors}",
            peer=self.session.peer_host,
            port=self.session.peer_port,
            commands=self._commands,
            messages=self._messages,
            recipients=self._recipients,
            errors=self._errors,
        )

    def handshakeCompleted(self) -> None:
        """TLS is up (IHandshakeListener): note the cipher for logs and Received."""
        try:
            handle = self.transport.getHandle()  # type: ignore[union-attr]
            cipher = f"{handle.get_protocol_version_name()} with cipher {handle.get_cipher_name()}"
        except Exception:  # not an OpenSSL connection (tests); the cipher is optional
            return
        self.session = attrs.evolve(self.session, tls_cipher=cipher)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.settings.idle_timeout)
        if not self._greeted and not self.session.pregreet:
            # an early talker (postscreen's pregreet test): spam engines do not wait
            self.session = attrs.evolve(self.session, pregreet=True)
            log.info(
                "smtpd: PREGREET {count} bytes from [{peer}]:{port}",
                count=len(data),
                peer=self.session.peer_host,
                port=self.session.peer_port,
            )
        self._buffer += data
        self._process()

    def _timed_out(self) -> None:
        self._timer = None
        if self._closing:
            return
        if self._waiting:  # our fault, not the client's: the reception bounds its time
            self._timer = self.server.clock.callLater(self.settings.idle_timeout, self._timed_out)
            return
        self._reply(Reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"), "-")

    def _shutdown(self, reply: Reply) -> None:
        """Say goodbye and close; nothing more is read."""
        self._write(reply)
        self._closing = True
        self._waiting = False
        self.transport.loseConnection()  # type: ignore[union-attr]

    # --- the loop ------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return  # a Deferred fired synchronously inside the loop: it goes on by itself
        self._processing = True
        try:
            while not self._waiting and not self._closing and self._step():
                pass
        finally:
            self._processing = False
            if self._pos:
                del self._buffer[: self._pos]
                self._pos = 0
        if self._closing:
            return
        if self._waiting and len(self._buffer) > self.settings.data_chunk_size:
            if not self._producer_paused:
                # the client keeps sending while we wait: stop reading its socket
                self._producer_paused = True
                self.transport.pauseProducing()  # type: ignore[union-attr]
        elif self._producer_paused and not self._waiting:
            self._producer_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _step(self) -> bool:
        """Act on what the buffer holds; False when more bytes are needed."""
        if self._mode == _Mode.DATA:
            return self._step_data()
        if self._mode == _Mode.BDAT:
            return self._step_bdat()
        line = self._take_line()
        if line is None:
            return False
        if self._mode == _Mode.AUTH:
            self._auth_response(line)
        else:
            self._command(line)
        return True

    def _take_line(self) -> bytes | None:
        buffer, start = self._buffer, self._pos
        if self._discarding_line:
            end = buffer.find(b"\r\n", start)
            if end < 0:
                self._pos = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
                return None
            self._pos = end + 2
            self._discarding_line = False
            start = self._pos
        limit = self.settings.max_line_length
        end = buffer.find(b"\r\n", start, start + limit)
        if end >= 0:
            self._pos = end + 2
            return bytes(buffer[start:end])
        if len(buffer) - start >= limit:
            self._discarding_line = True  # answer once, then skip to the next CRLF
            self._mode = _Mode.COMMAND
            self._mechanism = None
            self._reply(Reply(500, "5.5.6", "Error: line too long"), "line")
            return None if self._closing else self._take_line()
        return None

    # --- replies -------------------------------------------------------------------

    def _write(self, reply: Reply) -> None:
        if not self._closing:
            self._send(reply.to_bytes())

    def _send(self, data: bytes) -> None:
        """Write to the client; on plain TCP with nothing queued, straight to the socket.

        Twisted's transport.write registers the socket for writability and
        unregisters it after the send: two epoll_ctl calls and a reactor turn for
        every reply. A reply is a few dozen bytes and the socket buffer is almost
        always empty, so the send usually completes at once; what does not go
        (or anything with data already queued, or TLS) takes the normal path,
        so the order of bytes never changes.
        """
        transport = self.transport
        if (
            type(transport) is tcp.Server
            and not transport.TLS
            and not transport.dataBuffer
            and not transport._tempDataBuffer
            and not transport.disconnecting
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0  # EAGAIN or a dying connection: Twisted's write path deals with it
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)  # type: ignore[union-attr]

    def _reply(self, reply: Reply, command: str) -> None:
        """Answer a command; errors are logged and counted towards max_errors.

        A 421 (ours or the reception's) closes the connection, as RFC 5321 4.2.2 wants.
        """
        if self._closing:
            return
        if reply.code >= 400:
            self._errors += 1
            self._log_reject(command, reply)
        if reply.code == 421:
            self._shutdown(reply)
            return
        delay = self.settings.error_delay
        if reply.code >= 400 and self._errors > self.settings.soft_error_limit and delay > 0:
            # the tarpit: a client that keeps making errors gets slower answers
            self._waiting = True
            self._tarpit = self.server.clock.callLater(delay, self._after_tarpit, reply)
            return
        self._answer(reply)

    def _after_tarpit(self, reply: Reply) -> None:
        self._tarpit = None
        self._waiting = False
        if self._closing:
            return
        self._answer(reply)
        if not self._closing:
            self._process()

    def _answer(self, reply: Reply) -> None:
        self._write(reply)
        if reply.code >= 400 and self._errors >= self.settings.max_errors:
            self._log_reject("session", Reply(421, "4.7.0", "too many errors"))
            self._shutdown(Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many errors"))

    def _log_reject(self, command: str, reply: Reply) -> None:
        queue_id = self._queue_id()
        log.info(
            "smtpd: {prefix}reject {command} from [{peer}]:{port}: {reply}",
            prefix=f"{queue_id}: " if queue_id else "",
            queue_id=queue_id,
            command=command,
            peer=self.session.peer_host,
            port=self.session.peer_port,
            reply=str(reply),
        )

    def _queue_id(self) -> str:
        if self._message is not None:
            return str(self._message.queue_id)
        return self._queue_id_kept

    def _wait(
        self,
        deferred: Deferred[T],
        done: Callable[[T], Reply | Deferred[Reply] | None],
        command: str,
        on_error: Reply = TEMPORARY,
    ) -> None:
        """Pause the loop until ``deferred`` fires; then reply ``done(result)`` and go on.

        ``done`` may return None when it answered by itself (an AUTH challenge) or
        started another wait, which then owns the loop.
        """
        self._waiting = True
        self._wait_number += 1
        number = self._wait_number

        def failed(failure: Failure) -> Reply:
            log.failure(
                "smtpd: {command} from [{peer}]: the check failed",
                failure,
                command=command,
                peer=self.session.peer_host,
            )
            return on_error

        def answer(reply: Reply | None) -> None:
            if reply is None and self._wait_number != number:
                return  # a newer wait took over
            self._waiting = False
            if reply is not None:
                self._reply(reply, command)
            if not self._closing:
                self._process()

        def crashed(failure: Failure) -> None:
            log.failure("smtpd: internal error after {command}", failure, command=command)
            self._waiting = False
            self._shutdown(Reply(421, "4.3.0", f"{self.settings.hostname} internal error"))

        chained: Deferred[Any] = deferred.addCallbacks(done, failed)
        chained.addCallback(answer).addErrback(crashed)

    # --- commands ------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        self._commands += 1
        if not self.session.esmtp and self._pos < len(self._buffer) and not self.session.improper_pipelining:
            # the next command came before our reply, and PIPELINING was never offered
            self.session = attrs.evolve(self.session, improper_pipelining=True)
            log.info(
                "smtpd: improper command pipelining after {verb} from [{peer}]:{port}",
                verb=line[:4].decode("ascii", "replace").upper(),
                peer=self.session.peer_host,
                port=self.session.peer_port,
            )
        if self._commands > self.settings.max_commands:
            self._reply(Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many commands"), "-")
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply(500, "5.5.2", "Error: invalid characters in command"), "command")
            return
        if "\r" in text or "\n" in text or "\x00" in text:
            self._reply(Reply(500, "5.5.2", "Error: bare CR, LF or NUL in command"), "command")
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        handler = self._handlers.get(verb) if verb.isascii() else None
        if handler is None:
            if verb in _FORBIDDEN:
                self._reply(Reply(421, "4.7.0", f"{self.settings.hostname} Error: go away"), verb)
                return
            self._reply(Reply(500, "5.5.2", "Error: command not recognized"), "command")
            return
        try:
            reply = handler(argument)
        except CommandError as error:
            reply = error.reply
        if reply is not None:
            self._reply(reply, _describe(verb, argument))

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
        self._wait(maybeDeferred(self.checks.helo, session), checked, _describe(verb, argument))
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
        self._wait(check, checked, _describe("MAIL", argument))
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
        self._wait(check, checked, _describe("RCPT", argument))
        return None

    def _transaction_error(self) -> Reply | None:
        if self._envelope is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        if not self._envelope.rcpt_to:
            return Reply(554, "5.5.1", "Error: no valid recipients")
        return None

    def _data(self, argument: str) -> Reply | None:
        if argument.strip(" "):
            return Reply(501, "5.5.4", "Syntax: DATA")
        error = self._transaction_error()
        if error is not None:
            return error
        assert self._envelope is not None
        if self._envelope.body is Body.BINARY:
            return Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT")
        if self._message is not None:
            return Reply(503, "5.5.1", "Error: DATA inside a BDAT transfer")
        error = self._start_message()
        if error is not None:
            self._reset_transaction()
            return error
        self._reader = DotReader(self.settings.data_chunk_size)
        self._mode = _Mode.DATA
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _bdat(self, argument: str) -> Reply | None:
        match = _BDAT.match(argument)
        if match is None:
            # the chunk size is unknown, so the byte stream cannot be followed
            self._log_reject(_describe("BDAT", argument), Reply(501, "5.5.4", "bad BDAT syntax"))
            self._shutdown(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]; closing"))
            return None
        self._chunk_left = self._chunk_size = int(match.group(1))
        self._chunk_last = match.group(2) is not None
        if self._chunk_left == 0 and not self._chunk_last:
            pass  # an empty chunk counts as a command (a flood of them is bounded)
        else:
            self._commands -= 1  # chunks that carry data are bounded by the size limit
        self._chunk_error = self._bdat_error()
        self._mode = _Mode.BDAT
        return None

    def _bdat_error(self) -> Reply | None:
        if not self.session.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        error = self._transaction_error()
        if error is not None:
            return error
        if self._size + self._chunk_left > self.settings.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed limit")
        if self._message is None:
            return self._start_message()
        return None

    def _rset(self, argument: str) -> Reply:
        if argument.strip(" "):
            return Reply(501, "5.5.4", "Syntax: RSET")
        self._rsets += 1
        self._reset_transaction()
        return OK

    def _noop(self, argument: str) -> Reply:
        return OK

    def _quit(self, argument: str) -> None:
        self._shutdown(Reply(221, "2.0.0", "Bye"))

    def _help(self, argument: str) -> Reply:
        return Reply(214, "2.0.0", _HELP)

    def _vrfy(self, argument: str) -> Reply:
        if not argument.strip(" "):
            return Reply(501, "5.5.4", "Syntax: VRFY address")
        if not self.settings.vrfy_enabled:
            return Reply(502, "5.5.1", "VRFY command is disabled")
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def _expn(self, argument: str) -> Reply:
        return Reply(502, "5.5.1", "EXPN command is disabled")

    def _starttls(self, argument: str) -> Reply | None:
        if argument.strip(" "):
            return Reply(501, "5.5.4", "Syntax: STARTTLS")
        if not self._can_start_tls:
            return Reply(502, "5.5.1", "Error: command not implemented")
        if self.session.tls:
            return Reply(503, "5.5.1", "Error: TLS already active")
        if self._envelope is not None:
            return Reply(503, "5.5.1", "Error: STARTTLS inside a mail transaction")
        pipelined = len(self._buffer) - self._pos
        if pipelined:
            # CVE-2011-0411: plaintext sent after STARTTLS must not count as sent over TLS
            log.warn(
                "smtpd: discarded {count} bytes pipelined after STARTTLS from [{peer}]:{port}",
                count=pipelined,
                peer=self.session.peer_host,
                port=self.session.peer_port,
            )
            self._pos = len(self._buffer)
        self._write(Reply(220, "2.0.0", "Ready to start TLS"))
        self.transport.startTLS(self.server.tls_context)  # type: ignore[union-attr]
        # RFC 3207 4.2: forget everything learnt from the client before TLS
        self._reset_transaction()
        self._auth_failures = 0
        self.session = attrs.evolve(
            self.session,
            helo=None,
            esmtp=False,
            tls=True,
            authenticated_user=None,
            may_relay=self._relay_at_connect,
        )
        return None

    # --- AUTH ----------------------------------------------------------------------

    def _mechanisms(self) -> dict[str, Callable[[], _sasl.Plain | _sasl.Login | _sasl.CramMd5]]:
        credentials = self.server.credentials
        if credentials is None:
            return {}
        mechanisms: dict[str, Callable[[], _sasl.Plain | _sasl.Login | _sasl.CramMd5]] = {
            "PLAIN": _sasl.Plain,
            "LOGIN": _sasl.Login,
        }
        if credentials.supports_cram_md5:
            clock = self.server.clock
            mechanisms["CRAM-MD5"] = lambda: _sasl.CramMd5(self.settings.hostname, clock.seconds())
        return mechanisms

    def _auth(self, argument: str) -> Reply | None:
        mechanisms = self._mechanisms()
        if not mechanisms:
            return Reply(502, "5.5.1", "Error: authentication not enabled")
        if not self.session.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        if self.settings.auth_requires_tls and not self.session.tls:
            return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self.session.authenticated_user is not None:
            return Reply(503, "5.5.1", "Error: already authenticated")
        if self._envelope is not None:
            return Reply(503, "5.5.1", "Error: AUTH not allowed in a mail transaction")
        name, _, initial = argument.strip(" ").partition(" ")
        factory = mechanisms.get(name.upper())
        if factory is None:
            return Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
        response: bytes | None = None
        if initial:
            response = _decode_base64(initial)
            if response is None:
                return Reply(501, "5.5.2", "Error: invalid base64 in initial response")

        def allowed(refusal: Reply | None) -> Reply | None:
            if refusal is not None:
                return refusal
            self._mechanism = factory()
            step = self._sasl_step(response)
            if step is not None:
                return step
            return None  # a 334 challenge went out, or the credentials check is waiting

        self._wait(maybeDeferred(self.checks.auth_allowed, self.session), allowed, "AUTH")
        return None

    def _auth_response(self, line: bytes) -> None:
        self._mode = _Mode.COMMAND
        if line == b"*":
            self._mechanism = None
            self._reply(Reply(501, "5.0.0", "Authentication cancelled"), "AUTH")
            return
        response = _decode_base64(line.decode("ascii", "replace"))
        if response is None:
            self._mechanism = None
            self._reply(Reply(501, "5.5.2", "Error: invalid base64 in response"), "AUTH")
            return
        reply = self._sasl_step(response)
        if reply is not None:
            self._reply(reply, "AUTH")

    def _sasl_step(self, response: bytes | None) -> Reply | None:
        mechanism = self._mechanism
        credentials = self.server.credentials
        assert mechanism is not None and credentials is not None
        try:
            step = mechanism.step(response)
        except _sasl.SaslError as error:
            self._mechanism = None
            return Reply(501, "5.5.2", f"Error: {error}")
        if isinstance(step, _sasl.Challenge):
            self._mode = _Mode.AUTH
            # a 334 challenge is base64 after one space, even when empty (RFC 4954 4)
            self._send(b"334 " + base64.b64encode(step.data) + b"\r\n")
            return None
        self._mechanism = None
        if isinstance(step, _sasl.PlainAttempt):
            if step.authzid:
                check: Deferred[bool] = Deferred()
                check.callback(False)
            else:
                check = maybeDeferred(credentials.check_plain, step.user, step.password)
        else:
            check = maybeDeferred(credentials.check_cram_md5, step.user, step.challenge, step.digest)
        self._wait(
            check,
            lambda valid: self._auth_result(valid, step.user, mechanism.name),
            f"AUTH {mechanism.name}",
            on_error=Reply(454, "4.7.0", "Temporary authentication failure"),
        )
        return None

    def _auth_result(self, valid: bool, user: str, mechanism: str) -> Reply | Deferred[Reply]:
        if valid:
            self.checks.auth_result(self.session, user, True)
            self.session = attrs.evolve(self.session, authenticated_user=user, may_relay=True)
            log.info(
                "smtpd: [{peer}]:{port}: authenticated user={user} mechanism={mechanism}",
                peer=self.session.peer_host,
                port=self.session.peer_port,
                user=user,
                mechanism=mechanism,
            )
            return Reply(235, "2.7.0", "Authentication successful")
        self._auth_failures += 1
        log.info(
            "smtpd: [{peer}]:{port}: AUTH failed user={user!r} mechanism={mechanism}",
            peer=self.session.peer_host,
            port=self.session.peer_port,
            user=user[:64],
            mechanism=mechanism,
        )
        failed = Reply(535, "5.7.8", "Authentication credentials invalid")
        if self._auth_failures >= self.settings.max_auth_failures:
            failed = Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many AUTH failures")
        delay = max(self.settings.auth_failure_delay, self.checks.auth_result(self.session, user, False))
        if delay <= 0:
            return failed
        return deferLater(self.server.clock, delay, lambda: failed)

    # --- message data -----------------------------------------------------------------

    def _start_message(self) -> Reply | None:
        """Open the spool file and write our Received header; a Reply if that failed."""
        envelope = self._envelope
        assert envelope is not None
        try:
            message = cast(IncomingMessage, self.checks.new_message(self.session))
            self._message = message
            message.write(
                received_header(
                    self.session,
                    envelope,
                    hostname=self.settings.hostname,
                    queue_id=message.queue_id,
                    now=self.server.clock.seconds(),
                )
                + self.checks.header_block()
            )
        except Exception:
            log.failure("smtpd: cannot start a message for [{peer}]", peer=self.session.peer_host)
            self._abort_message()
            return TEMPORARY
        self._size = 0
        self._failure = None
        self._newlines = NewlineChecker()
        self._headers = HeaderScanner()
        internet = self.session.role is Role.INBOUND and not self.session.may_relay
        self._stripper = HeaderStripper() if internet else None
        self._carry = b""
        return None

    def _step_data(self) -> bool:
        start = self._pos
        content, self._pos, finished = self._reader.read(self._buffer, start)
        if content:
            self._take(content, text=True)
        if finished:
            self._mode = _Mode.COMMAND
            self._end_of_message("DATA")
        return finished or self._pos != start

    def _step_bdat(self) -> bool:
        if self._chunk_left:
            available = len(self._buffer) - self._pos
            if not available:
                return False
            count = min(available, self._chunk_left)
            chunk = bytes(self._buffer[self._pos : self._pos + count])
            self._pos += count
            self._chunk_left -= count
            if self._chunk_error is None:
                self._take_bdat(chunk)
            if self._chunk_left:
                return True
        self._mode = _Mode.COMMAND
        self._end_chunk()
        return True

    def _take_bdat(self, chunk: bytes) -> None:
        assert self._envelope is not None
        if self._envelope.body is Body.BINARY:
            self._take(chunk, text=False)
            return
        chunk = self._carry + chunk
        self._carry = b""
        if chunk.endswith(b"\r") and not (self._chunk_last and self._chunk_left == 0):
            self._carry, chunk = b"\r", chunk[:-1]  # its LF may start the next chunk
        if chunk:
            self._take(chunk, text=True)

    def _take(self, content: bytes, *, text: bool) -> None:
        """Message bytes from the client: check them and hand them to the spool."""
        if self._failure is not None or self._message is None:
            return  # already failed: read to the end, keep nothing
        self._size += len(content)
        if self._size > self.settings.max_message_size:
            self._fail(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
            return
        if text and self._newlines.feed(content):
            if self.settings.reject_bare_lf:
                self._fail(Reply(550, "5.5.2", "Error: bare CR or LF in message data"))
                return
            content = normalize_newlines(content)
        self._headers.feed(content)
        if self._headers.done and self._headers.received > self.settings.max_hops:
            self._fail(Reply(554, "5.4.6", "Too many hops: mail forwarding loop"))
            return
        if self._stripper is not None:
            content = self._stripper.feed(content)
        try:
            self._message.write(content)
        except Exception:
            log.failure("smtpd: {queue_id}: cannot write the message", queue_id=self._queue_id())
            self._fail(TEMPORARY)

    def _fail(self, reply: Reply) -> None:
        """The transaction failed: keep reading to its end, then answer ``reply``."""
        self._failure = reply
        self._abort_message(keep_id=True)

    def _end_chunk(self) -> None:
        if self._chunk_error is not None:
            error, self._chunk_error = self._chunk_error, None
            self._reply_failed("BDAT", error)
            return
        if self._failure is not None:
            self._reply_failed("BDAT", self._failure)
            return
        if not self._chunk_last:
            self._reply(Reply(250, "2.0.0", f"{self._chunk_size} octets received"), "BDAT")
            return
        if self._carry:
            carry, self._carry = self._carry, b""
            self._take(carry, text=True)
        self._end_of_message("BDAT")

    def _end_of_message(self, command: str) -> None:
        envelope, message = self._envelope, self._message
        failure = self._failure
        if failure is None and self._headers.finish() > self.settings.max_hops:
            failure = Reply(554, "5.4.6", "Too many hops: mail forwarding loop")
        if failure is None and message is not None and self._stripper is not None:
            try:
                message.write(self._stripper.finish())
            except Exception:
                log.failure("smtpd: {queue_id}: cannot write the message", queue_id=self._queue_id())
                failure = TEMPORARY
        if failure is not None or envelope is None or message is None:
            self._reply_failed(command, failure or TEMPORARY)
            return
        self._message = None  # from here on, the reception owns it
        queue_id = self._queue_id_kept = str(message.queue_id)

        def failed(failure: Failure) -> Reply:
            log.failure("smtpd: {queue_id}: accept failed", failure, queue_id=queue_id)
            return TEMPORARY

        def accepted(reply: Reply) -> Reply:
            if reply.is_positive:
                self._messages += 1
            self._envelope = None
            self._size = 0
            return reply

        accept = maybeDeferred(self.checks.accept, self.session, envelope, message)
        self._wait(accept.addErrback(failed), accepted, command)

    def _reply_failed(self, command: str, failure: Reply) -> None:
        """End a failed transaction: answer (logged with its queue id), then forget it."""
        self._abort_message(keep_id=True)
        self._reply(failure, command)
        self._reset_transaction()

    # --- transaction state --------------------------------------------------------

    def _abort_message(self, *, keep_id: bool = False) -> None:
        message, self._message = self._message, None
        if message is None:
            return
        if keep_id:
            self._queue_id_kept = str(message.queue_id)
        try:
            message.abort()
        except Exception:
            log.failure("smtpd: aborting message {queue_id} failed", queue_id=message.queue_id)

    def _reset_transaction(self) -> None:
        self._abort_message()
        self._envelope = None
        self._failure = None
        self._size = 0
        self._carry = b""
        self._queue_id_kept = ""
        self._chunk_error = None


def _decode_base64(text: str) -> bytes | None:
    """Strict base64 (``=`` alone is the empty response); None if malformed."""
    text = text.strip()
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _describe(verb: str, argument: str) -> str:
    """A command for the log: arguments of AUTH are secrets, others are shortened."""
    if verb == "AUTH":
        return "AUTH " + argument.split(" ", 1)[0][:20]
    return f"{verb} {argument[:200]}".rstrip() if argument else verb
