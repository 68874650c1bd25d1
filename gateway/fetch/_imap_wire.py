"""The IMAP wire: one command at a time, each with its own tag, answers read by the bounded parser.

`ImapProtocol` is what `gateway.fetch.imap`'s session talks through: commands
and their completions (`Completion`), literals sent as the server allows
(`Literal`, `astring`), the answer timer (each command's answer within the
account's timeout, IDLE's waiting excepted), STARTTLS with any bytes the server
sends after its OK refused as an injection attempt.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.fetch import (
    FetchError,
    ProtocolViolation,
    Writer,
)
from gateway.fetch._connect import TlsStage
from gateway.fetch._imap_parse import (
    ContinuationRequest,
    DataResponse,
    Response,
    ResponseReader,
    StatusResponse,
    quoted,
)
from gateway.tcp import send_at_once

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
IDLE_RENEWAL = 29 * 60.0  # RFC 2177: servers may drop an IDLE after 30 minutes


@attrs.frozen
class Literal:
    """A command argument sent as a literal ({n} and a continuation, or {n+} with LITERAL+)."""

    payload: bytes = attrs.field(repr=False)


Part = bytes | Literal


def astring(value: str) -> Part:
    """A command argument as a quoted string, or as a literal when it must be (8-bit, line breaks)."""
    raw = value.encode("utf-8")
    text = quoted(raw)
    return Literal(raw) if text is None else text


@attrs.frozen
class Completion:
    """A command's tagged answer and the untagged responses that came while it ran."""

    status: StatusResponse
    untagged: tuple[DataResponse | StatusResponse, ...]

    @property
    def ok(self) -> bool:
        return self.status.status == "OK"

    def data(self, kind: str) -> list[DataResponse]:
        return [
            response
            for response in self.untagged
            if isinstance(response, DataResponse) and response.kind == kind
        ]

    def codes(self, code: str) -> list[str]:
        """The arguments of response code `code` in the untagged OKs and the tagged answer."""
        statuses = [r for r in self.untagged if isinstance(r, StatusResponse)] + [self.status]
        return [status.code_text for status in statuses if status.code == code]


class _Command:
    """One command: what to write (chunks, one per continuation), and who waits for its answer."""

    __slots__ = (
        "chunks",
        "deferred",
        "on_continuation",
        "parts",
        "sink",
        "starttls",
        "tag",
        "timeout",
        "untagged",
        "what",
    )

    def __init__(
        self,
        parts: list[Part],
        what: str,
        timeout: float | None,
        *,
        on_continuation: Callable[[ContinuationRequest], None] | None = None,
        sink: Writer | None = None,
        starttls: bool = False,
    ) -> None:
        self.parts = parts
        self.what = what  # "logging in as alice": for error messages, never the arguments
        self.timeout = timeout
        self.on_continuation = on_continuation
        self.sink = sink
        self.starttls = starttls
        self.tag = ""
        self.chunks: collections.deque[bytes] = collections.deque()
        self.untagged: list[DataResponse | StatusResponse] = []
        self.deferred: Deferred[Completion] = Deferred()


@implementer(IHandshakeListener)
class ImapProtocol(Protocol):
    """Commands out, one at a time with their tags; responses in through a bounded reader."""

    def __init__(
        self,
        clock: IReactorTime,
        peer: str,
        timeout: float,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        implicit_tls: bool = False,
        tls_options: Callable[[], Any] | None = None,
    ) -> None:
        self.clock = clock
        self.peer = peer
        self.timeout = timeout
        self.reader = ResponseReader(max_literal=max_message_size)
        self.tls = TlsStage(peer)
        if implicit_tls:
            self.tls.implicit()
        self.tls_options = tls_options
        self.capabilities: frozenset[str] = frozenset()
        self.greeting: Deferred[StatusResponse] = Deferred()
        self.on_untagged: Callable[[DataResponse], None] | None = None
        self.error: FetchError | None = None  # why the connection ended, if not by LOGOUT
        self.closed = False
        self.logging_out = False
        self.bye = ""
        self._greeted = False
        self._current: _Command | None = None
        self._queue: collections.deque[_Command] = collections.deque()
        self._counter = 0
        self._timer: IDelayedCall | None = None
        self._timer_what = "waiting for the greeting"
        self._closed_waiters: list[Deferred[None]] = []

    # -- Twisted callbacks --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        send_at_once(self.transport)
        self._arm(self.timeout, "waiting for the greeting")

    def dataReceived(self, data: bytes) -> None:
        if self.closed or self.error is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timer_delay)  # an answer in progress: it has not stalled
        self.reader.feed(data)
        try:
            while self.error is None:
                response = self.reader.next_response()
                if response is None:
                    break
                self._handle(response)
        except FetchError as error:
            self.fail(error)

    def handshakeCompleted(self) -> None:
        self.tls.completed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._disarm()
        if self.error is None:
            if self.bye and not self.logging_out:
                self.error = FetchError(f"{self.peer} ended the session: {self.bye}")
            else:
                stage = self._current.what if self._current is not None else "idle"
                if not self._greeted:
                    stage = "waiting for the greeting"
                self.error = self.tls.lost_error(reason, stage)
        self._fail_waiting(self.error)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- what the session uses ----------------------------------------------------------------------

    def command(
        self,
        parts: list[Part],
        what: str,
        *,
        timeout: float | None = -1.0,
        on_continuation: Callable[[ContinuationRequest], None] | None = None,
        sink: Writer | None = None,
        starttls: bool = False,
    ) -> Deferred[Completion]:
        """Send a command (after those before it are answered); fires with its Completion.

        It fails with the connection's error if the connection breaks first.
        `timeout` -1 means the protocol's; None, none (IDLE, once idling).
        """
        command = _Command(
            parts,
            what,
            self.timeout if timeout == -1.0 else timeout,
            on_continuation=on_continuation,
            sink=sink,
            starttls=starttls,
        )
        if self.error is not None:
            command.deferred.errback(self.error)
            return command.deferred
        self._queue.append(command)
        if self._current is None:
            self._send_next()
        return command.deferred

    def send_line(self, line: bytes, *, timeout: float | None = None) -> None:
        """A line that is not a command (IDLE's DONE, a SASL answer); re-arms the answer timer."""
        if self.transport is not None and not self.closed:
            self.transport.write(line + b"\r\n")
        if timeout is not None and self._current is not None:
            self._current.timeout = timeout
            self._arm(timeout, self._current.what)

    def stop_timer(self) -> None:
        """No answer is due for now (IDLE is waiting for the server)."""
        if self._current is not None:
            self._current.timeout = None
        self._disarm()

    def fail(self, error: FetchError) -> None:
        """End the connection at once with `error` for everyone waiting."""
        if self.error is None:
            self.error = error
        self._fail_waiting(self.error)
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def when_closed(self) -> Deferred[None]:
        if self.closed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    # -- responses ----------------------------------------------------------------------------------

    def _handle(self, response: Response) -> None:
        if not self._greeted:
            self._greet(response)
            return
        current = self._current
        if isinstance(response, ContinuationRequest):
            if current is not None and current.chunks:
                assert self.transport is not None
                self.transport.write(current.chunks.popleft())
            elif current is not None and current.on_continuation is not None:
                current.on_continuation(response)
            else:
                raise ProtocolViolation(f"{self.peer} sent a continuation request nobody asked for")
            return
        if isinstance(response, StatusResponse) and response.tagged:
            if current is None or response.tag != current.tag:
                raise ProtocolViolation(
                    f"{self.peer} answered a command never sent (tag {response.tag!r:.20})"
                )
            self._complete(current, response)
            return
        if isinstance(response, StatusResponse):
            if response.status == "BYE":
                self.bye = response.text or "BYE"
            if response.code == "CAPABILITY":
                self._set_capabilities(response.code_text.split())
        else:
            if response.kind == "CAPABILITY":
                self._set_capabilities([str(value) for value in response.values])
            if self.on_untagged is not None:
                self.on_untagged(response)
        if current is not None:
            current.untagged.append(response)

    def _greet(self, response: Response) -> None:
        if (
            not isinstance(response, StatusResponse)
            or response.tagged
            or response.status not in ("OK", "PREAUTH", "BYE")
        ):
            raise ProtocolViolation(f"{self.peer} did not greet as an IMAP server does")
        self._greeted = True
        self._disarm()
        if response.code == "CAPABILITY":
            self._set_capabilities(response.code_text.split())
        if response.status == "BYE":
            self.bye = response.text or "BYE"
            self.fail(FetchError(f"{self.peer} refused the session: {self.bye}"))
            return
        self.greeting.callback(response)

    def _complete(self, command: _Command, status: StatusResponse) -> None:
        if command.starttls and status.status == "OK":
            # The OK must be the last plain text: anything after it was put there by someone
            # between us and the server, to be read as if it came over TLS (CVE-2011-0411).
            if self.reader.pending:
                raise ProtocolViolation(f"{self.peer} sent data after its STARTTLS OK (injected plain text?)")
            assert self.tls_options is not None
            self.tls.start(self.transport, self.tls_options())
            self.capabilities = frozenset()  # asked again over TLS (RFC 3501 6.2.1)
        elif status.code == "CAPABILITY":
            self._set_capabilities(status.code_text.split())
        self._current = None
        self._disarm()
        self.reader.body_sink = None
        command.deferred.callback(Completion(status, tuple(command.untagged)))
        if self._current is None and self.error is None:
            self._send_next()

    def _set_capabilities(self, names: Iterable[str]) -> None:
        self.capabilities = frozenset(name.upper() for name in names)

    # -- commands -----------------------------------------------------------------------------------

    def _send_next(self) -> None:
        if not self._queue or self.transport is None:
            return
        command = self._queue.popleft()
        self._counter += 1
        command.tag = f"M{self._counter}"
        command.chunks = collections.deque(self._render(command))
        self._current = command
        self.reader.body_sink = command.sink
        self.transport.write(command.chunks.popleft())
        if command.timeout is not None:
            self._arm(command.timeout, command.what)

    def _render(self, command: _Command) -> list[bytes]:
        """The command's bytes, cut where a synchronizing literal waits for a continuation."""
        plus = "LITERAL+" in self.capabilities
        minus = "LITERAL-" in self.capabilities
        chunks: list[bytes] = []
        line = command.tag.encode("ascii") + b" "
        for part in command.parts:
            if isinstance(part, Literal):
                size = len(part.payload)
                if plus or (minus and size <= 4096):
                    line += b"{%d+}\r\n" % size + part.payload
                else:
                    chunks.append(line + b"{%d}\r\n" % size)
                    line = part.payload
            else:
                line += part
        chunks.append(line + b"\r\n")
        return chunks

    def _fail_waiting(self, error: FetchError) -> None:
        self._disarm()
        waiting = ([self._current] if self._current is not None else []) + list(self._queue)
        self._current = None
        self._queue.clear()
        if not self.greeting.called:
            self.greeting.errback(error)
        for command in waiting:
            if not command.deferred.called:
                command.deferred.errback(error)

    # -- timer --------------------------------------------------------------------------------------

    _timer_delay = 0.0

    def _arm(self, delay: float, what: str) -> None:
        self._disarm()
        self._timer_delay = delay
        self._timer_what = what
        self._timer = self.clock.callLater(delay, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.fail(
            FetchError(f"{self.peer} did not answer within {self._timer_delay:g} s while {self._timer_what}")
        )


# -- logging in ---------------------------------------------------------------------------------------
