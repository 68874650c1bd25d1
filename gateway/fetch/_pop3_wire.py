"""The wire layer of the POP3 client: commands out, responses in, in order, bounded.

`Pop3Wire` is a Twisted protocol holding a queue of `_Request`s, the oldest
first: each gets one status line ("+OK ..." or "-ERR ..."), and a multi-line
one (LIST, UIDL, CAPA, RETR, TOP) after a "+OK" also the lines up to the "."
terminator, dot-unstuffed. A listing is collected into lines (each at most
`MAX_LINE` octets, at most `MAX_LISTING_LINES` of them); a message (RETR,
TOP) is streamed to its writer in pieces as it arrives, CRLF line ends kept
(a bare LF is made CRLF), so memory stays bounded by the receive buffer
however long the message or its lines are.

With `pipelining` on (the server's CAPA says PIPELINING), commands are written
at once and the replies come back in order; without it, a command waits until
the previous answer is complete. One timer watches the oldest request: if no
byte arrives for `timeout` seconds while an answer is awaited, the connection
is dropped (an inactivity timeout, so a large message may take longer as a whole).

STLS: the "+OK" must be the last plain-text byte. Bytes already received after
it are an injection attempt (CVE-2011-0411 style): the connection is dropped
with `ProtocolViolation`. Bytes that arrive later in plain text reach the TLS
layer and break the handshake (`TlsRefused`).

Errors: a status line that is neither +OK nor -ERR, an over-long line or
listing, a line nobody asked for, or a message far larger than announced is a
`ProtocolViolation`; a lost connection or a timeout is a `FetchError`
(`TlsRefused` while the TLS handshake runs). Every waiting request fails with
the same error. Commands are never kept in errors: PASS's argument appears nowhere.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.fetch import FetchError, ProtocolViolation
from gateway.fetch._connect import TlsStage
from gateway.fetch._wire import WireBase
from gateway.tcp import send_at_once

MAX_LINE = 4096  # a status or listing line; RFC 1939 allows 512 octets, be lenient but bounded
MAX_LISTING_LINES = 500_000  # UIDL/LIST of a very full maildrop; ~20 MB at most
STREAM_PIECE = 64 * 1024  # a message line longer than this is passed on in parts

Writer = Callable[[bytes], None]


@attrs.frozen
class Response:
    """One POP3 answer: +OK or -ERR, its text, the RFC 2449/3206 code, a listing or an octet count."""

    ok: bool
    text: str
    code: str = ""  # "AUTH", "IN-USE", "SYS/TEMP", ... from "-ERR [AUTH] ..."; "" when none
    lines: tuple[bytes, ...] = ()  # a collected multi-line answer (CAPA, LIST, UIDL), unstuffed
    octets: int = 0  # a streamed answer (RETR, TOP): octets passed to the writer
    more: bool = False  # a SASL continuation ("+ <base64>") to AUTH: `text` is its base64, `ok` False


class _Request:
    """One command and the answer it waits for."""

    __slots__ = ("command", "deferred", "limit", "multiline", "sasl", "sink", "stage", "tls")

    def __init__(
        self,
        command: bytes | None,  # None: the greeting, nothing to send
        stage: str,  # "RETR 3", "PASS": for error texts (never an argument that is secret)
        multiline: bool,
        sink: Writer | None = None,
        limit: int = 0,  # a streamed answer larger than this is a protocol violation (0: none)
        tls: IOpenSSLClientConnectionCreator | None = None,  # STLS: start TLS on +OK
        sasl: bool = False,  # AUTH: "+ <base64>" is a continuation, not a violation
    ) -> None:
        self.command = command
        self.stage = stage
        self.multiline = multiline
        self.sink = sink
        self.limit = limit
        self.tls = tls
        self.sasl = sasl
        self.deferred: Deferred[Response] = Deferred()


def _status(line: bytes) -> tuple[bool, str, str] | None:
    """(+OK?, text, code) of a status line, None if it is neither +OK nor -ERR."""
    head, _, rest = line.partition(b" ")
    upper = head.upper()
    if upper == b"+OK":
        ok = True
    elif upper == b"-ERR":
        ok = False
    else:
        return None
    text = rest.decode("utf-8", "replace").strip()
    code = ""
    if text.startswith("[") and "]" in text:
        code, _, remainder = text[1:].partition("]")
        code, text = code.strip().upper(), remainder.strip()
    return ok, text, code


@implementer(IHandshakeListener)
class Pop3Wire(WireBase, Protocol):
    """POP3 responses in order to the commands sent; a greeting request from the start."""

    def __init__(self, clock: IReactorTime, peer: str, timeout: float, implicit_tls: bool = False) -> None:
        self.clock = clock
        self.peer = peer
        self.timeout = timeout
        self.pipelining = False
        self.tls = TlsStage(peer)
        if implicit_tls:
            self.tls.implicit()
        self.error: BaseException | None = None  # why the connection ended, if not by QUIT
        self.closed = False
        self._buffer = b""
        self._sent: collections.deque[_Request] = collections.deque()
        self._held: collections.deque[_Request] = collections.deque()
        self._in_body = False
        self._at_line_start = True
        self._collected: list[bytes] = []
        self._octets = 0
        self._pending = Response(True, "")
        self._timer: IDelayedCall | None = None
        self._handshake_waiters: list[Deferred[None]] = []
        self._closed_waiters: list[Deferred[None]] = []
        greeting = _Request(None, "receiving the greeting", multiline=False)
        self.greeting = greeting.deferred
        self._sent.append(greeting)

    # -- Twisted callbacks ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        send_at_once(self.transport)
        self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.closed or self.error is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        self._buffer += data
        while self._buffer and self.error is None:
            if not self._sent:
                self._violation(f"{self.peer} sent {self._buffer[:60]!r} when no answer was due")
                return
            if self._in_body:
                if not self._body():
                    return
            elif not self._status_line():
                return

    def handshakeCompleted(self) -> None:
        self.tls.completed()
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return  # already reported (by a timeout or a violation) before the transport did
        self.closed = True
        self._cancel_timer()
        if self.error is None:
            stage = self._sent[0].stage if self._sent else "idle"
            self.error = self.tls.lost_error(reason, stage)
        self._fail_all(self.error)
        for waiter in self._handshake_waiters:
            waiter.errback(self.error)
        self._handshake_waiters = []
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- what the session calls ---------------------------------------------------------------------

    def command(
        self,
        command: bytes,
        stage: str,
        multiline: bool = False,
        sink: Writer | None = None,
        limit: int = 0,
        tls: IOpenSSLClientConnectionCreator | None = None,
        sasl: bool = False,
    ) -> Deferred[Response]:
        """Send a command (now, or once the previous answer is in without pipelining).

        `sasl`: the command is AUTH or a line of its exchange: a "+ <base64>" answer is
        a continuation (`Response.more`), and the line is held back like STLS (no pipelining).
        """
        if b"\r" in command or b"\n" in command or b"\0" in command:
            raise ValueError(f"{stage}: a POP3 command may not contain CR, LF or NUL")
        request = _Request(command, stage, multiline, sink, limit, tls, sasl)
        if self.closed or self.error is not None:
            request.deferred.errback(self.error or FetchError(f"connection with {self.peer} is closed"))
        elif tls is not None or sasl or not self.pipelining or self._held:
            self._held.append(request)
            self._send_held()
        else:
            self._write(request)
        return request.deferred

    def when_closed(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self.closed:
            waiter.callback(None)
        else:
            self._closed_waiters.append(waiter)
        return waiter

    # -- internals ----------------------------------------------------------------------------------

    def _write(self, request: _Request) -> None:
        self._sent.append(request)
        if self._timer is None:
            self._start_timer()
        assert self.transport is not None and request.command is not None
        self.transport.write(request.command + b"\r\n")

    def _send_held(self) -> None:
        # Without pipelining, and always around STLS, one command at a time.
        while self._held:
            if self._sent and (
                not self.pipelining
                or self._held[0].tls is not None
                or self._sent[-1].tls is not None
                or self._held[0].sasl
                or self._sent[-1].sasl
            ):
                return
            self._write(self._held.popleft())

    def _status_line(self) -> bool:
        """Read one status line; False when more data is needed."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                self._violation(f"{self.peer} sent an over-long line while {self._sent[0].stage}")
            return False
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        line = line.rstrip(b"\r")
        if len(line) > MAX_LINE:
            self._violation(f"{self.peer} sent an over-long line while {self._sent[0].stage}")
            return False
        status = _status(line)
        request = self._sent[0]
        if status is None and request.sasl and (line == b"+" or line.startswith(b"+ ")):
            self._finish(Response(False, line[2:].decode("ascii", "replace").strip(), more=True))
            return True
        if status is None:
            self._violation(f"{self.peer} answered {line[:80]!r} (neither +OK nor -ERR) to {request.stage}")
            return False
        ok, text, code = status
        if ok and request.multiline:
            self._in_body = True
            self._at_line_start = True
            self._collected = []
            self._octets = 0
            self._pending = Response(ok, text, code)
            return True
        if ok and request.tls is not None:
            if self._buffer:
                self._violation(
                    f"{self.peer} sent {len(self._buffer)} bytes after its +OK to STLS, before TLS began"
                    " (a plain-text injection): refused"
                )
                return False
            # TLS first: whatever the caller sends on this +OK must go out encrypted.
            try:
                self.tls.start(self.transport, request.tls)
            except FetchError as error:
                self.abort(error)
                return False
            self._finish(Response(ok, text, code))
            return False
        self._finish(Response(ok, text, code))
        return True

    def _body(self) -> bool:
        """Read the lines of a multi-line answer; False when more data is needed."""
        request = self._sent[0]
        buffer = self._buffer
        pieces: list[bytes] = []
        position = 0
        done = False
        while True:
            end = buffer.find(b"\n", position)
            if end < 0:
                break
            line = buffer[position:end]
            position = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._at_line_start and line[:1] == b".":
                if line == b".":
                    done = True
                    break
                line = line[1:]  # dot-unstuffing (RFC 1939 3)
            self._at_line_start = True
            if request.sink is None:
                if len(line) > MAX_LINE or len(self._collected) >= MAX_LISTING_LINES:
                    self._violation(f"{self.peer} sent an over-long answer to {request.stage}")
                    return False
                self._collected.append(line)
            else:
                pieces.append(line)
                pieces.append(b"\r\n")
        rest = buffer[position:]
        if not done:
            if request.sink is None and len(rest) > MAX_LINE:
                self._violation(f"{self.peer} sent an over-long answer to {request.stage}")
                return False
            if request.sink is not None and len(rest) > STREAM_PIECE:
                # A very long line: pass it on now, keeping the last byte (it may be the CR of CRLF).
                part = rest[:-1]
                if self._at_line_start and part[:1] == b".":
                    part = part[1:]
                pieces.append(part)
                rest = rest[-1:]
                self._at_line_start = False
        self._buffer = rest
        if pieces and request.sink is not None and not self._emit(request, b"".join(pieces)):
            return False
        if done:
            self._in_body = False
            pending = self._pending
            self._finish(
                Response(
                    pending.ok, pending.text, pending.code, lines=tuple(self._collected), octets=self._octets
                )
            )
            self._collected = []
            return True
        return False

    def _emit(self, request: _Request, piece: bytes) -> bool:
        self._octets += len(piece)
        if request.limit and self._octets > request.limit:
            self._violation(
                f"{self.peer} sent more than {request.limit} octets in answer to {request.stage}"
                " (far more than it announced)"
            )
            return False
        assert request.sink is not None
        try:
            request.sink(piece)
        except Exception as error:  # the writer (the spool) failed: this answer cannot go on
            self._sent.popleft()
            self.abort(
                FetchError(f"session with {self.peer} aborted: writing {request.stage} failed: {error}")
            )
            request.deferred.errback(error)
            return False
        return True

    def _finish(self, response: Response) -> None:
        request = self._sent.popleft()
        if self._sent:
            self._start_timer()
        else:
            self._cancel_timer()
        request.deferred.callback(response)
        if not self.closed and self.error is None:
            self._send_held()

    def _waiting_for(self) -> str:
        return self._sent[0].stage if self._sent else "idle"

    def _violation(self, text: str) -> None:
        self.abort(ProtocolViolation(text))

    def _fail_all(self, error: BaseException) -> None:
        requests = [*self._sent, *self._held]
        self._sent.clear()
        self._held.clear()
        for request in requests:
            request.deferred.errback(error)
