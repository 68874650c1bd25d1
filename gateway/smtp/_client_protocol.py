"""The wire layer of the SMTP/LMTP client: replies in, commands out, timeouts.

`ClientProtocol` reads replies into one bounded buffer and hands each to the
oldest waiter, so pipelined commands get their replies in order; a pipelined
group of commands (`send_batch`) shares one Deferred that fires with all its
replies. One timer watches the oldest waiter (like Postfix's per-read
timeouts): it is moved on to the next waiter, not made anew for each reply. STARTTLS
throws away whatever plaintext came after the 220 before the handshake (R7).
`MessageSender` streams the message file through a `DotStuffer` as a push
producer: memory stays bounded by the transport's buffer, not the message. A
message shorter than one chunk goes out in a single write with its terminator
(no producer, no timer: there is nothing left to stream).
"""

from __future__ import annotations

import collections
import re
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.smtp._dotstuff import DotStuffer
from gateway.smtp.reply import Reply
from gateway.tcp import send_at_once

MAX_LINE = 4096  # RFC 5321 says 512 for a reply line; be lenient, but bounded
MAX_LINES = 200  # lines in one multi-line reply

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


class ClientError(Exception):
    """The conversation with a server broke: no reply to act on.

    `text` is our own one-line reason, Postfix-style ("lost connection with
    mx.example[192.0.2.1]:25 while receiving the initial server greeting").
    """

    def __init__(self, text: str, enhanced: str = "4.4.2", *, tls_failed: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced
        self.tls_failed = tls_failed


def parse_reply(lines: list[bytes]) -> Reply:
    """One reply from its lines (CRLF removed); enhanced codes split off (RFC 2034)."""
    code = int(lines[0][:3])
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    enhanced = None
    match = _ENHANCED.match(texts[0])
    if match and match.group(1) == str(code)[0]:
        enhanced = match.group(0)
        texts = [t[len(enhanced) :].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


class _Waiter:
    """One reply expected: for its own Deferred, or for a batch's list (`replies`).

    In a batch every waiter appends its reply to the shared `replies` list; only
    the last one has the Deferred, which fires with the whole list.
    """

    __slots__ = ("deferred", "replies", "stage", "timeout", "tls")

    def __init__(
        self,
        deferred: Deferred[Any] | None,
        stage: str,  # "receiving the initial server greeting", for error texts
        timeout: float,
        tls: object = None,  # TLS options: start TLS with them on a 220
        replies: list[Reply] | None = None,
    ) -> None:
        self.deferred = deferred
        self.stage = stage
        self.timeout = timeout
        self.tls = tls
        self.replies = replies


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """Replies in order to the commands sent; a greeting waiter from the start."""

    def __init__(self, clock: IReactorTime, peer: str, greeting_timeout: float) -> None:
        self.clock = clock
        self.peer = peer
        self._buffer = b""
        self._lines: list[bytes] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._timer: IDelayedCall | None = None
        self._generation = 0
        self.closed = False
        self.tls_started = False
        self.tls_done = False
        self.error: ClientError | None = None  # why the connection ended, if it did not end cleanly
        self.sender: MessageSender | None = None
        self._closed_waiters: list[Deferred[None]] = []
        self.greeting = self._expect("receiving the initial server greeting", greeting_timeout)

    # -- Twisted callbacks ------------------------------------------------------

    def connectionMade(self) -> None:
        send_at_once(self.transport)  # commands pipelined as they come, not held for ACKs

    def dataReceived(self, data: bytes) -> None:
        generation = self._generation
        self._buffer += data
        if b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                self._fail(f"{self.peer} sent an over-long reply line")
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if generation != self._generation or self.closed:
                return  # STARTTLS began: the rest was plaintext, thrown away
            line = line[:-1] if line.endswith(b"\r") else line
            if len(line) > MAX_LINE:
                self._fail(f"{self.peer} sent an over-long reply line")
                return
            self._line(line)
        if len(self._buffer) > MAX_LINE:
            self._fail(f"{self.peer} sent an over-long reply line")

    def handshakeCompleted(self) -> None:
        self.tls_done = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._cancel_timer()
        if self.error is None:
            stage = self._waiters[0].stage if self._waiters else "idle"
            if self.sender is not None and not self.sender.finished:
                stage = "sending message body"
            if self.tls_started and not self.tls_done:
                detail = reason.getErrorMessage() or "connection closed"
                self.error = ClientError(
                    f"TLS handshake with {self.peer} failed: {detail}", "4.7.5", tls_failed=True
                )
            else:
                self.error = ClientError(f"lost connection with {self.peer} while {stage}")
        self._fail_all(self.error)
        waiters, self._closed_waiters = self._closed_waiters, []
        for deferred in waiters:
            deferred.callback(None)

    def when_closed(self) -> Deferred[None]:
        """A Deferred that fires once the connection is closed."""
        deferred: Deferred[None] = Deferred()
        if self.closed:
            deferred.callback(None)
        else:
            self._closed_waiters.append(deferred)
        return deferred

    # -- what the session calls ---------------------------------------------------

    def send(self, commands: list[tuple[bytes, str, float]]) -> list[Deferred[Reply]]:
        """Write commands in one go (pipelining); one Deferred per command, in order."""
        replies = [self._expect(stage, timeout) for _line, stage, timeout in commands]
        if not self.closed:
            assert self.transport is not None
            self.transport.write(b"".join(line + b"\r\n" for line, _stage, _timeout in commands))
        return replies

    def send_batch(self, commands: list[tuple[bytes, str, float]]) -> Deferred[list[Reply]]:
        """Write commands in one go (pipelining); one Deferred for all their replies, in order.

        It fails with the ClientError if the connection breaks before the last reply.
        """
        deferred: Deferred[list[Reply]] = self._batch(
            [(stage, timeout) for _line, stage, timeout in commands]
        )
        if not self.closed:
            assert self.transport is not None
            self.transport.write(b"".join([line + b"\r\n" for line, _stage, _timeout in commands]))
        return deferred

    def command(self, line: bytes, stage: str, timeout: float) -> Deferred[Reply]:
        deferred = self._expect(stage, timeout)
        if not self.closed:
            assert self.transport is not None
            self.transport.write(line + b"\r\n")
        return deferred

    def expect(self, stage: str, timeout: float) -> Deferred[Reply]:
        """Wait for a reply without sending anything (end of data, LMTP replies)."""
        return self._expect(stage, timeout)

    def expect_batch(self, stage: str, timeout: float, count: int) -> Deferred[list[Reply]]:
        """Wait for `count` replies without sending anything; one Deferred for all of them."""
        return self._batch([(stage, timeout)] * count)

    def starttls(self, options: object, timeout: float) -> Deferred[Reply]:
        """STARTTLS; on a 220 the handshake starts before anything else is read."""
        deferred: Deferred[Reply] = Deferred()
        self._add(_Waiter(deferred, "receiving the STARTTLS response", timeout, tls=options))
        if not self.closed:
            assert self.transport is not None
            self.transport.write(b"STARTTLS\r\n")
        return deferred

    def abort(self, error: ClientError | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close after what was written has gone out."""
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    @property
    def busy(self) -> bool:
        return bool(self._waiters)

    # -- internals ------------------------------------------------------------------

    def _expect(self, stage: str, timeout: float) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        self._add(_Waiter(deferred, stage, timeout))
        return deferred

    def _batch(self, stages: list[tuple[str, float]]) -> Deferred[list[Reply]]:
        deferred: Deferred[list[Reply]] = Deferred()
        replies: list[Reply] = []
        last = len(stages) - 1
        for n, (stage, timeout) in enumerate(stages):
            self._add(_Waiter(deferred if n == last else None, stage, timeout, replies=replies))
        return deferred

    def _add(self, waiter: _Waiter) -> None:
        if self.closed:
            assert self.error is not None
            if waiter.deferred is not None:
                waiter.deferred.errback(self.error)
            return
        self._waiters.append(waiter)
        if self._timer is None:
            self._start_timer()

    def _line(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
            self._fail(f"{self.peer} sent a malformed reply: {line[:80]!r}")
            return
        if self._lines and line[:3] != self._lines[0][:3]:
            self._fail(f"{self.peer} sent a multi-line reply with mixed codes")
            return
        self._lines.append(line)
        if line[3:4] == b"-":
            if len(self._lines) > MAX_LINES:
                self._fail(f"{self.peer} sent an over-long reply")
            return
        reply = parse_reply(self._lines)
        self._lines = []
        if not self._waiters:
            self._fail(f"{self.peer} sent a reply nobody asked for: {str(reply)[:80]}")
            return
        waiters = self._waiters
        waiter = waiters.popleft()
        if not waiters:
            self._cancel_timer()
        elif self._timer is not None and self._timer.active():
            self._timer.reset(waiters[0].timeout)  # the next reply gets its full time
        else:
            self._start_timer()
        if waiter.tls is not None and reply.code == 220:
            # R7: whatever came after the 220 was sent in plaintext; drop it
            self._buffer = b""
            self._generation += 1
            self.tls_started = True
            transport = ITLSTransport(self.transport)
            transport.startTLS(waiter.tls)  # type: ignore[arg-type]
        if waiter.replies is not None:
            waiter.replies.append(reply)
            if waiter.deferred is not None:
                waiter.deferred.callback(waiter.replies)
        elif waiter.deferred is not None:
            waiter.deferred.callback(reply)

    def _start_timer(self) -> None:
        self._timer = self.clock.callLater(self._waiters[0].timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        stage = self._waiters[0].stage if self._waiters else "idle"
        self.abort(ClientError(f"conversation with {self.peer} timed out while {stage}"))
        if not self.closed:  # a transport that does not report the abort at once
            self.connectionLost(Failure(self.error))  # type: ignore[no-untyped-call]

    def _fail(self, text: str) -> None:
        self.abort(ClientError(text, "4.5.0"))

    def _fail_all(self, error: ClientError) -> None:
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if waiter.deferred is not None:
                waiter.deferred.errback(error)
        if self.sender is not None:
            self.sender.stop(error)


@implementer(IPushProducer)
class MessageSender:
    """Streams a message file to the transport, dot-stuffed, ending with the terminator."""

    def __init__(
        self,
        protocol: ClientProtocol,
        message: IO[bytes],
        chunk_size: int,
        timeout: float,
    ) -> None:
        self.protocol = protocol
        self.message = message
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.stuffer = DotStuffer()
        self.done: Deferred[None] = Deferred()
        self.finished = False
        self._paused = False
        self._running = False
        self._timer: IDelayedCall | None = None
        self._pending = b""  # read by `start`, not yet sent

    def start(self) -> Deferred[None]:
        transport = self.protocol.transport
        assert transport is not None
        try:
            chunk = self.message.read(self.chunk_size)
        except OSError as error:
            self.finished = True
            self.message.close()
            self.done.errback(ClientError(f"cannot read the queued message: {error}", "4.3.0"))
            self.protocol.abort(ClientError(f"cannot read the queued message: {error}", "4.3.0"))
            return self.done
        if len(chunk) < self.chunk_size:  # the whole message (a short read is the end of the file)
            self.finished = True
            self.message.close()
            transport.write(self.stuffer.encode(chunk) + self.stuffer.finish())
            self.done.callback(None)
            return self.done
        self._pending = chunk
        self.protocol.sender = self
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._touch()
        self.resumeProducing()
        return self.done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._running or self.finished:
            return
        self._running = True
        try:
            transport = self.protocol.transport
            assert transport is not None
            while not self._paused and not self.finished:
                if self._pending:
                    chunk, self._pending = self._pending, b""
                else:
                    chunk = self.message.read(self.chunk_size)
                if not chunk:
                    self._finish(self.stuffer.finish())
                    break
                self._touch()
                transport.write(self.stuffer.encode(chunk))
        except OSError as error:
            self.stop(ClientError(f"cannot read the queued message: {error}", "4.3.0"))
            self.protocol.abort(ClientError(f"cannot read the queued message: {error}", "4.3.0"))
        finally:
            self._running = False

    def stopProducing(self) -> None:
        self.stop(self.protocol.error or ClientError(f"lost connection with {self.protocol.peer}"))

    def stop(self, error: ClientError) -> None:
        if self.finished:
            return
        self.finished = True
        self._cleanup()
        self.done.errback(error)

    def _finish(self, terminator: bytes) -> None:
        self.finished = True
        transport = self.protocol.transport
        assert transport is not None
        transport.write(terminator)
        self._cleanup()
        self.done.callback(None)

    def _cleanup(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.message.close()
        if self.protocol.sender is self:
            self.protocol.sender = None
            if self.protocol.transport is not None and not self.protocol.closed:
                self.protocol.transport.unregisterProducer()  # type: ignore[attr-defined]

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        else:
            self._timer = self.protocol.clock.callLater(self.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        error = ClientError(f"conversation with {self.protocol.peer} timed out while sending message body")
        self.stop(error)
        self.protocol.abort(error)


class ClientFactory(Factory):
    """Builds the client protocol once connected: the greeting timeout starts then, not before."""

    def __init__(self, clock: IReactorTime, peer: str, greeting_timeout: float) -> None:
        self.clock = clock
        self.peer = peer
        self.greeting_timeout = greeting_timeout

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
        return ClientProtocol(self.clock, self.peer, self.greeting_timeout)
