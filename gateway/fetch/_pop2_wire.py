"""The wire layer of the POP2 client (RFC 937): one command at a time, bounded.

POP2 answers with one line: "+" (yes), "-" (no), "#n" (a message count, to
HELO and FOLD) or "=n" (a message length, to READ and the acknowledgements).
RETR is answered by exactly the announced number of octets, with no status
line and no terminator: `Pop2Wire.command(..., octets=n, sink=write)` counts
them off to the writer (CRLF line ends kept, a bare LF made CRLF).

Commands are written one at a time, each once the previous answer is
complete (POP2 servers know nothing of pipelining). One timer watches the
outstanding answer: no byte for `timeout` seconds drops the connection.
Errors: a line that is none of the four answers, an over-long line, or bytes
nobody asked for are a `ProtocolViolation`; a lost connection or a timeout
a `FetchError` (`TlsRefused` while the implicit TLS handshake runs). The
command is never kept in an error (HELO carries the password).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.fetch import FetchError, ProtocolViolation
from gateway.fetch._connect import TlsStage
from gateway.fetch._wire import WireBase
from gateway.tcp import send_at_once

__all__ = ["MAX_LINE", "Answer", "Pop2Wire"]

MAX_LINE = 1024  # an answer line; RFC 937 ones are a few octets, the greeting a little text

Writer = Callable[[bytes], None]


@attrs.frozen
class Answer:
    """One POP2 answer: its kind ("+", "-", "#", "=", or "data" for RETR), number and text."""

    kind: str
    number: int = 0  # "#n" and "=n"; for "data", the octets passed on
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.kind != "-"


class _Request:
    __slots__ = ("command", "deferred", "octets", "sink", "stage")

    def __init__(self, command: bytes | None, stage: str, octets: int, sink: Writer | None) -> None:
        self.command = command  # None: the greeting
        self.stage = stage  # for error texts, never the command itself
        self.octets = octets  # RETR: the octets that follow instead of a line (-1: a line)
        self.sink = sink
        self.deferred: Deferred[Answer] = Deferred()


def parse_answer(line: bytes) -> Answer | None:
    """The answer a line holds, None if it is not a POP2 answer."""
    head, rest = line[:1], line[1:]
    if head in (b"+", b"-"):
        return Answer(head.decode(), text=rest.decode("utf-8", "replace").strip())
    if head in (b"#", b"="):
        digits, _, text = rest.strip().partition(b" ")
        if not digits.isdigit() or len(digits) > 12:
            return None
        return Answer(head.decode(), int(digits), text.decode("utf-8", "replace").strip())
    return None


@implementer(IHandshakeListener)
class Pop2Wire(WireBase, Protocol):
    """POP2 answers to the commands sent, in order; a greeting request from the start."""

    def __init__(self, clock: IReactorTime, peer: str, timeout: float, implicit_tls: bool = False) -> None:
        self.clock = clock
        self.peer = peer
        self.timeout = timeout
        self.tls = TlsStage(peer)
        if implicit_tls:
            self.tls.implicit()
        self.error: BaseException | None = None
        self.closed = False
        self._buffer = b""
        self._sent: _Request | None = None
        self._held: collections.deque[_Request] = collections.deque()
        self._remaining = 0  # octets of a RETR answer still to come
        self._passed = 0
        self._last_cr = False
        self._timer: IDelayedCall | None = None
        self._handshake_waiters: list[Deferred[None]] = []
        greeting = _Request(None, "receiving the greeting", -1, None)
        self.greeting = greeting.deferred
        self._sent = greeting

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
        while self._buffer and self.error is None and not self.closed:
            request = self._sent
            if request is None:
                self._violation(f"{self.peer} sent {self._buffer[:60]!r} when no answer was due")
                return
            if request.octets >= 0:
                if not self._data(request):
                    return
            elif not self._line(request):
                return

    def handshakeCompleted(self) -> None:
        self.tls.completed()
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if self.error is None:
            stage = self._sent.stage if self._sent else "idle"
            self.error = self.tls.lost_error(reason, stage)
        requests = [self._sent] if self._sent else []
        requests.extend(self._held)
        self._sent = None
        self._held.clear()
        for request in requests:
            request.deferred.errback(self.error)
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for waiter in waiters:
            waiter.errback(self.error)

    # -- what the session calls ---------------------------------------------------------------------

    def command(
        self, command: bytes, stage: str, octets: int = -1, sink: Writer | None = None
    ) -> Deferred[Answer]:
        """Send a command once the previous answer is in; `octets` >= 0: RETR's raw answer to `sink`."""
        if any(char in command for char in b"\r\n\0"):
            raise ValueError(f"{stage}: a POP2 command may not contain CR, LF or NUL")
        request = _Request(command, stage, octets, sink)
        if self.closed or self.error is not None:
            request.deferred.errback(self.error or FetchError(f"connection with {self.peer} is closed"))
        else:
            self._held.append(request)
            self._send_held()
        return request.deferred

    # -- internals ----------------------------------------------------------------------------------

    def _send_held(self) -> None:
        if self._sent is not None or not self._held:
            return
        request = self._held.popleft()
        self._sent = request
        self._remaining = request.octets
        self._passed = 0
        self._last_cr = False
        self._start_timer()
        assert self.transport is not None and request.command is not None
        self.transport.write(request.command + b"\r\n")
        if request.octets == 0:  # an empty message: nothing follows
            self._finish(Answer("data", 0))

    def _line(self, request: _Request) -> bool:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                self._violation(f"{self.peer} sent an over-long line while {request.stage}")
            return False
        line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
        if len(line) > MAX_LINE:
            self._violation(f"{self.peer} sent an over-long line while {request.stage}")
            return False
        answer = parse_answer(line)
        if answer is None:
            self._violation(f"{self.peer} answered {line[:80]!r} (not a POP2 answer) to {request.stage}")
            return False
        self._finish(answer)
        return True

    def _data(self, request: _Request) -> bool:
        piece, self._buffer = self._buffer[: self._remaining], self._buffer[self._remaining :]
        self._remaining -= len(piece)
        self._passed += len(piece)
        # Bare LF made CRLF; a CR ending the last piece and an LF starting this one are one CRLF.
        joined = self._last_cr and piece[:1] == b"\n"
        out = b"\n" + _crlf(piece[1:]) if joined else _crlf(piece)
        self._passed += len(out) - len(piece)
        self._last_cr = piece[-1:] == b"\r"
        assert request.sink is not None
        try:
            request.sink(out)
        except Exception as error:  # the writer (the spool) failed: the answer cannot go on
            self._sent = None
            self.abort(
                FetchError(f"session with {self.peer} aborted: writing {request.stage} failed: {error}")
            )
            request.deferred.errback(error)
            return False
        if self._remaining == 0:
            self._finish(Answer("data", self._passed))
            return True
        return False

    def _finish(self, answer: Answer) -> None:
        request = self._sent
        assert request is not None
        self._sent = None
        self._cancel_timer()
        request.deferred.callback(answer)
        if not self.closed and self.error is None:
            self._send_held()

    def _waiting_for(self) -> str:
        return self._sent.stage if self._sent else "idle"

    def _violation(self, text: str) -> None:
        self.abort(ProtocolViolation(text))


def _crlf(piece: bytes) -> bytes:
    return piece.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
