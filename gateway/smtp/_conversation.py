"""How the SMTP server answers, and what its parts share: modes, replies, their contract.

`gateway.smtp.server.SmtpServerProtocol` is one class assembled from mixins, one
per role: the envelope commands (`gateway.smtp._transaction`), the AUTH exchange
(`gateway.smtp._auth_exchange`) and the message data (`gateway.smtp._message_data`).
Each inherits `Conversation`: the replies (error counting, the tarpit, the 421
that closes), the fast write path, and `_wait`, which pauses the command loop
while the reception answers and turns any failure of it into a 4xx. It also
declares, for the type checker only, the state and the methods the roles use
of one another; server.py and the mixins define them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.smtp.reply import Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IDelayedCall, ITransport

    from gateway.model import Envelope, Session
    from gateway.smtp import _sasl
    from gateway.smtp._session import ServerSettings, SessionChecks
    from gateway.smtp.server import SmtpServerFactory

__all__ = ["OK", "TEMPORARY", "Conversation", "Mode", "describe", "log"]

log = Logger(namespace="mailgate.smtpd")
T = TypeVar("T")

OK = Reply(250, "2.0.0", "Ok")
TEMPORARY = Reply(451, "4.3.0", "Temporary failure, please try again later")


class Mode:
    """What the next bytes from the client are."""

    COMMAND = "command"
    AUTH = "auth"  # waiting for a SASL response line
    DATA = "data"
    BDAT = "bdat"


class Conversation:
    """Answering the client and waiting for the reception; the roles' shared contract."""

    if TYPE_CHECKING:
        transport: ITransport | None
        server: SmtpServerFactory
        settings: ServerSettings
        session: Session
        checks: SessionChecks
        _buffer: bytearray
        _pos: int  # what of _buffer is consumed
        _mode: str
        _waiting: bool  # a Deferred from the reception is pending
        _closing: bool
        _wait_number: int
        _tarpit: IDelayedCall | None
        _can_start_tls: bool
        _envelope: Envelope | None
        _commands: int
        _errors: int
        _messages: int
        _recipients: int
        _rsets: int

        # server.py
        def _process(self) -> None: ...
        def _shutdown(self, reply: Reply) -> None: ...

        # _transaction.py
        def _reset_transaction(self) -> None: ...

        # _auth_exchange.py
        def _mechanisms(self) -> dict[str, Callable[[], _sasl.Plain | _sasl.Login | _sasl.CramMd5]]: ...

        # _message_data.py
        def _abort_message(self, *, keep_id: bool = False) -> None: ...
        def _forget_message(self) -> None: ...
        def _queue_id(self) -> str: ...

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


def describe(verb: str, argument: str) -> str:
    """A command for the log: arguments of AUTH are secrets, others are shortened."""
    if verb == "AUTH":
        return "AUTH " + argument.split(" ", 1)[0][:20]
    return f"{verb} {argument[:200]}".rstrip() if argument else verb
