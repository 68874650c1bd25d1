"""The gateway's SMTP server: a protocol on a Twisted transport, and its factory.

One `SmtpServerProtocol` per connection. It reads into one bounded buffer and works
through it in order; whenever it asks the `Reception` something (MAIL, RCPT, end of
data) it stops reading commands until the answer comes, so pipelined commands are
answered strictly in order and nothing is lost or doubled (RFC 2920). Message data
goes to the spool in large chunks as it arrives (`gateway.smtp._data`).

This module holds the connection, the command loop and the simple commands
(NOOP, QUIT, HELP, VRFY, EXPN, STARTTLS). The protocol's other roles are mixins
in private modules: replies and waiting for the reception
(`gateway.smtp._conversation`), HELO/EHLO, MAIL, RCPT and RSET
(`gateway.smtp._transaction`), AUTH (`gateway.smtp._auth_exchange`), DATA and
BDAT (`gateway.smtp._message_data`).

Security choices (each has a regression test named after the attack):

- bytes pipelined after STARTTLS are thrown away (CVE-2011-0411), and the session
  goes back to its pre-EHLO state after the handshake (RFC 3207 4.2): `_starttls`
  here;
- an over-long command line is answered once and skipped, never buffered:
  `_take_line` here;
- only CRLF.CRLF ends DATA; bare CR / LF are refused or made CRLF (smuggling):
  `gateway.smtp._message_data` with the readers of `gateway.smtp._data`;
- any failure of the reception is a 4xx (``451 4.3.0``), never a 5xx:
  `Conversation._wait` in `gateway.smtp._conversation`, `_end_of_message` in
  `gateway.smtp._message_data`, and `_check_failed` here (CONNECT).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.model import Role, Session
from gateway.smtp._auth_exchange import AuthExchange
from gateway.smtp._conversation import OK, Mode, describe, log
from gateway.smtp._message_data import MessageData
from gateway.smtp._session import (
    NO_CHECKS,
    Network,
    Reception,
    ServerSettings,
    SessionChecks,
    in_networks,
    may_etrn,
)
from gateway.smtp._transaction import Transaction
from gateway.smtp.address import CommandError
from gateway.smtp.auth import ICredentials
from gateway.smtp.reply import Reply
from gateway.tcp import send_at_once

if TYPE_CHECKING:
    from gateway.config import Config, ListenerConfig

__all__ = ["ServerSettings", "SmtpServerFactory", "SmtpServerProtocol"]

# HTTP and POP3 through an SMTP port: a proxy abuse or a confused client; hang up
_FORBIDDEN = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD", "USER", "PASS"})
_HELP = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY ETRN STARTTLS AUTH"
_ETRN_NODE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,252})")


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
            etrn_enabled=smtp.etrn,
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
class SmtpServerProtocol(Transaction, AuthExchange, MessageData, Protocol):
    """One SMTP connection: the command loop, STARTTLS; with its mixins, every command."""

    def __init__(self, factory: SmtpServerFactory) -> None:
        self.server = factory
        self.settings = factory.settings
        self.session = Session(peer_host="unknown")
        self._buffer = bytearray()
        self._pos = 0  # what of _buffer is consumed
        self._mode = Mode.COMMAND
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
        self._envelope = None  # the transaction; its message is MessageData's
        self._init_message_data()
        self._init_auth()
        # counters for limits and the disconnect log line
        self._commands = 0
        self._errors = 0
        self._messages = 0
        self._recipients = 0
        self._rsets = 0
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
            "ETRN": self._etrn,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
        }

    # --- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        send_at_once(self.transport)
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
        if self._mode == Mode.DATA:
            return self._step_data()
        if self._mode == Mode.BDAT:
            return self._step_bdat()
        line = self._take_line()
        if line is None:
            return False
        if self._mode == Mode.AUTH:
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
            self._mode = Mode.COMMAND
            self._mechanism = None
            self._reply(Reply(500, "5.5.6", "Error: line too long"), "line")
            return None if self._closing else self._take_line()
        return None

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
            self._reply(reply, describe(verb, argument))

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

    def _etrn(self, argument: str) -> Reply:
        """RFC 1985: deliver the mail waiting for a domain, and fetch its mailboxes, now."""
        node = argument.strip(" ")
        domain = node.lstrip("#@")
        if not domain or not _ETRN_NODE.fullmatch(domain):
            return Reply(501, "5.5.4", "Syntax: ETRN domain")
        if not self.settings.etrn_enabled:
            return Reply(502, "5.5.1", "ETRN command is disabled")
        if not may_etrn(self.session):
            return Reply(459, "4.7.1", f"<{domain}>: ETRN is for the internal servers only")
        if self._envelope is not None:
            return Reply(503, "5.5.1", "Error: MAIL transaction in progress")
        return self.checks.etrn(self.session, domain.lower())

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
