"""The IMAP4rev1 client of poll mode: one logged-in session with one folder (RFC 3501).

`connect_imap(account, reactor)` connects (IMAPS, or STARTTLS, or plain text
only when the account says tls = "none"), logs in (AUTHENTICATE PLAIN, with
SASL-IR when offered, or LOGIN; or AUTHENTICATE XOAUTH2 with the access token
the poller got from the account's token command as the password), selects the account's folder and fires with
an `ImapSession`, the `IMailboxSession` the poller uses:

- `list_messages()`: UID FETCH 1:* (UID RFC822.SIZE); a message's uid is
  "<UIDVALIDITY>:<UID>", so a folder whose UIDVALIDITY changed never matches
  the seen-UID store's old entries.
- `retrieve(message, write)`: UID FETCH n (BODY.PEEK[]); the literal goes to
  `write` as it arrives, never held whole, and nothing is marked \\Seen.
- `delete(messages)`: remembered only; `close()` sets \\Deleted on exactly
  those UIDs and removes them with UID EXPUNGE (UIDPLUS, RFC 4315). Without
  UIDPLUS it has to send EXPUNGE, which also removes messages another client
  marked \\Deleted in the same folder (IMAP has no narrower command). A session
  that is aborted or dropped before `close()` has flagged nothing.
- `move(messages, folder)`: UID MOVE (RFC 6851), or UID COPY and deletion at
  `close()` where MOVE is missing; a folder that does not exist is created.
- `idle(on_change)`: IDLE (RFC 2177) until `done()`, renewed every 29 minutes;
  `on_change()` is called when the server reports new mail (EXISTS, RECENT).

The wire layer, `ImapProtocol`, sends one command at a time with its own tag
and reads responses with the bounded `ResponseReader`. Each command's answer
must come within the account's timeout (IDLE's waiting excepted). Bytes the
server sends after its STARTTLS OK are refused as an injection attempt; a
password is only sent over TLS whose handshake has completed, unless the
account is tls = "none". Passwords appear in no error or log message.
"""

from __future__ import annotations

import base64
import collections
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.fetch import (
    AuthenticationFailed,
    FetchError,
    IMailboxSession,
    MailboxAccount,
    ProtocolViolation,
    RemoteMessage,
    TlsRefused,
    Writer,
)
from gateway.fetch._connect import TlsStage, client_tls_options, connect, describe
from gateway.fetch._imap_parse import (
    ContinuationRequest,
    DataResponse,
    Response,
    ResponseReader,
    StatusResponse,
    Streamed,
    encode_folder,
    fetch_attributes,
    number_value,
    quoted,
    sequence_set,
)
from gateway.fetch._token import xoauth2_error, xoauth2_response
from gateway.tcp import send_at_once

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "IDLE_RENEWAL",
    "ImapProtocol",
    "ImapSession",
    "connect_imap",
    "start_session",
]

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
IDLE_RENEWAL = 29 * 60.0  # RFC 2177: servers may drop an IDLE after 30 minutes
MAX_SET_LENGTH = 4000  # octets of UIDs in one command; servers limit a command line (Dovecot: 64 KiB)

_log = Logger()


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


def connect_imap(
    account: MailboxAccount, reactor: Any, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> Deferred[ImapSession]:
    """Connect, log in and select the account's folder; fires with the session.

    Fails with `AuthenticationFailed` (credentials refused), `TlsRefused` (no
    STARTTLS, a certificate refused, a handshake failed), `ProtocolViolation`
    or `FetchError` (unreachable, timed out, the folder cannot be opened).
    """
    peer = describe(account)

    def build() -> ImapProtocol:
        return ImapProtocol(
            reactor,
            peer,
            account.timeout,
            max_message_size=max_message_size,
            implicit_tls=account.tls == "implicit",
            tls_options=lambda: client_tls_options(account),
        )

    async def open_session() -> ImapSession:
        protocol = await connect(account, reactor, build)
        return await start_session(protocol, account, reactor)

    return Deferred.fromCoroutine(open_session())


def start_session(
    protocol: ImapProtocol, account: MailboxAccount, clock: IReactorTime
) -> Deferred[ImapSession]:
    """On a connected protocol: greeting, STARTTLS if the account says so, login, SELECT.

    If any step fails the connection is dropped (the failure says why).
    """

    async def opening() -> ImapSession:
        try:
            return await _open(protocol, account, clock)
        except Exception as error:  # (not GeneratorExit: a collected coroutine has nothing to drop)
            reason = error if isinstance(error, FetchError) else FetchError(f"{protocol.peer}: {error}")
            protocol.fail(reason)
            raise

    return Deferred.fromCoroutine(opening())


async def _open(protocol: ImapProtocol, account: MailboxAccount, clock: IReactorTime) -> ImapSession:
    peer = protocol.peer
    greeting = await protocol.greeting
    preauth = greeting.status == "PREAUTH"
    if not protocol.capabilities:
        await _capability(protocol)
    if account.tls == "starttls":
        if preauth:
            raise TlsRefused(f"{peer} greeted with PREAUTH in plain text, where STARTTLS is impossible")
        if "STARTTLS" not in protocol.capabilities:
            raise TlsRefused(f"{peer} does not offer STARTTLS (the account requires it)")
        answer = await protocol.command([b"STARTTLS"], "starting TLS", starttls=True)
        if not answer.ok:
            raise TlsRefused(f"{peer} refused STARTTLS: {answer.status.text}")
        await _capability(protocol)
    if not preauth:
        if account.tls != "none" and not protocol.tls.secure:
            raise TlsRefused(f"{peer}: TLS is not up; the password is not sent")
        await _authenticate(protocol, account)
    session = ImapSession(protocol, account, clock)
    await session._select()
    return session


async def _capability(protocol: ImapProtocol) -> None:
    answer = await protocol.command([b"CAPABILITY"], "asking for the capabilities")
    if not answer.ok:
        raise ProtocolViolation(f"{protocol.peer} answered CAPABILITY with {answer.status.status}")


async def _authenticate(protocol: ImapProtocol, account: MailboxAccount) -> None:
    peer, capabilities = protocol.peer, protocol.capabilities
    what = f"logging in as {account.username}"
    mechanism = account.auth.lower()
    if mechanism == "auto":
        mechanism = "plain" if "AUTH=PLAIN" in capabilities else "login"
    if mechanism == "plain":
        token = base64.b64encode(
            b"\0" + account.username.encode("utf-8") + b"\0" + account.password.encode("utf-8")
        )
        answered: list[bool] = []

        def respond(_request: ContinuationRequest) -> None:
            # the answer to the (empty) challenge; a second challenge has no place in PLAIN
            protocol.send_line(b"*" if answered else token)
            answered.append(True)

        if "SASL-IR" in capabilities:
            answered.append(True)
            answer = await protocol.command([b"AUTHENTICATE PLAIN " + token], what, on_continuation=respond)
        else:
            answer = await protocol.command([b"AUTHENTICATE PLAIN"], what, on_continuation=respond)
    elif mechanism == "xoauth2":
        answer = await _xoauth2(protocol, account, what)
    elif mechanism == "login":
        if "LOGINDISABLED" in capabilities:
            raise AuthenticationFailed(
                f"{peer} does not allow LOGIN (LOGINDISABLED) and offers no AUTH=PLAIN"
            )
        parts = [b"LOGIN ", astring(account.username), b" ", astring(account.password)]
        answer = await protocol.command(parts, what)
    else:
        raise FetchError(
            f"{peer}: unknown IMAP authentication {account.auth!r} (auto, plain, login or xoauth2)"
        )
    if answer.ok:
        if not _has_capability_data(answer):
            await _capability(protocol)  # they may change once logged in (UIDPLUS, MOVE, IDLE)
        return
    if answer.status.code == "UNAVAILABLE":
        raise FetchError(f"{peer} cannot log in {account.username} now: {answer.status.text}")
    raise AuthenticationFailed(f"{peer} refused the login of {account.username}: {answer.status.text}")


async def _xoauth2(protocol: ImapProtocol, account: MailboxAccount, what: str) -> Completion:
    """AUTHENTICATE XOAUTH2 (SASL-IR when offered); `account.password` is the access token.

    The server's error comes as a continuation (base64 JSON): it is answered with an
    empty line, and the tagged NO that follows fails the login as AuthenticationFailed.
    """
    token = xoauth2_response(account.username, account.password)
    sent: list[bool] = []
    refusal: list[str] = []

    def respond(request: ContinuationRequest) -> None:
        if sent:  # the error, after our token
            refusal.append(xoauth2_error(request.text))
            protocol.send_line(b"")
        else:
            sent.append(True)
            protocol.send_line(token)

    if "SASL-IR" in protocol.capabilities:
        sent.append(True)
        answer = await protocol.command([b"AUTHENTICATE XOAUTH2 " + token], what, on_continuation=respond)
    else:
        answer = await protocol.command([b"AUTHENTICATE XOAUTH2"], what, on_continuation=respond)
    if not answer.ok and refusal:
        raise AuthenticationFailed(
            f"{protocol.peer} refused the XOAUTH2 login of {account.username}: {refusal[0]}"
            f" ({answer.status.text})"
        )
    return answer


def _has_capability_data(answer: Completion) -> bool:
    return bool(answer.data("CAPABILITY")) or bool(answer.codes("CAPABILITY"))


# -- the session ------------------------------------------------------------------------------------


class _Idle:
    """An IDLE in progress: whom to tell, and the Deferred that fires when it ends."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.ended: Deferred[None] = Deferred()
        self.command: Deferred[Completion] | None = None
        self.idling = False  # the server said "+ idling"
        self.stopping = False
        self.renewing = False
        self.renewal: IDelayedCall | None = None
        self.done_sent = False  # DONE written for the current IDLE command
        self.done_waiters: list[Deferred[None]] = []


@implementer(IMailboxSession)
class ImapSession:
    """A logged-in IMAP session with the account's folder selected."""

    def __init__(self, protocol: ImapProtocol, account: MailboxAccount, clock: IReactorTime) -> None:
        self.protocol = protocol
        self.account = account
        self.clock = clock
        self.peer = protocol.peer
        self.folder = account.folder
        self.uidvalidity = 0
        self.uidnext = 0
        self.exists = 0
        self.read_only = False
        self._new_mail = False  # EXISTS grew since the last list_messages
        self._deleted: set[int] = set()
        self._idle: _Idle | None = None
        self._closing = False
        protocol.on_untagged = self._untagged

    @property
    def capabilities(self) -> frozenset[str]:
        return self.protocol.capabilities

    # -- IMailboxSession ----------------------------------------------------------------------------

    def list_messages(self) -> Deferred[list[RemoteMessage]]:
        return Deferred.fromCoroutine(self._list())

    def retrieve(self, message: RemoteMessage, write: Writer) -> Deferred[int]:
        return Deferred.fromCoroutine(self._retrieve(message, write))

    def delete(self, messages: list[RemoteMessage]) -> Deferred[None]:
        """Remembered; \\Deleted and UID EXPUNGE happen at `close()` (aborted: nothing is flagged)."""
        try:
            self._deleted.update(self._uid(message) for message in messages)
        except FetchError as error:
            failed: Deferred[None] = Deferred()
            failed.errback(error)
            return failed
        return succeed(None)

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    def abort(self) -> None:
        self._end_idle_state(FetchError(f"{self.peer}: session aborted"))
        self.protocol.fail(FetchError(f"{self.peer}: session aborted"))

    # -- beyond the interface -----------------------------------------------------------------------

    def move(self, messages: list[RemoteMessage], folder: str) -> Deferred[None]:
        """Move messages to `folder` now (UID MOVE), or copy them now and delete them at `close()`."""
        return Deferred.fromCoroutine(self._move(messages, folder))

    def idle(self, on_change: Callable[[], None]) -> Deferred[None]:
        """Wait in IDLE, calling `on_change()` when new mail is reported, until `done()`.

        Fires with None once `done()` has ended it, or fails with the error that
        ended the session. `on_change` may be called more than once for one
        message (EXISTS and RECENT), and at once if mail came since the last
        `list_messages()`. Any other command ends the IDLE first.
        """
        if "IDLE" not in self.capabilities:
            return _failed(FetchError(f"{self.peer} does not offer IDLE"))
        if self._idle is not None:
            return _failed(FetchError(f"{self.peer}: already in IDLE"))
        if self._closing or self.protocol.error is not None:
            return _failed(self.protocol.error or FetchError(f"{self.peer}: session closed"))
        idle = self._idle = _Idle(on_change)
        self._start_idle(idle)
        return idle.ended

    def done(self) -> Deferred[None]:
        """Leave IDLE (DONE); fires once the server has answered. At once if not idling."""
        idle = self._idle
        if idle is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        idle.done_waiters.append(waiter)
        if not idle.stopping:
            idle.stopping = True
            self._cancel_renewal(idle)
            if idle.idling:
                self._send_done(idle)
        return waiter

    # -- folder -------------------------------------------------------------------------------------

    async def _select(self) -> None:
        name = encode_folder(self.folder).encode("ascii")
        answer = await self.protocol.command(
            [b"SELECT ", quoted(name) or name], f"opening the folder {self.folder!r}"
        )
        if not answer.ok:
            raise FetchError(f"{self.peer} cannot open the folder {self.folder!r}: {answer.status.text}")
        validity = answer.codes("UIDVALIDITY")
        if not validity:
            raise ProtocolViolation(f"{self.peer} gave no UIDVALIDITY for the folder {self.folder!r}")
        self.uidvalidity = number_value(validity[-1].strip(), "UIDVALIDITY")
        uidnext = answer.codes("UIDNEXT")
        self.uidnext = number_value(uidnext[-1].strip(), "UIDNEXT") if uidnext else 0
        self.read_only = answer.status.code == "READ-ONLY"
        self._new_mail = False

    def _untagged(self, response: DataResponse) -> None:
        if response.kind == "EXISTS" and response.number is not None:
            if response.number > self.exists:
                self._new_mail = True
            self.exists = response.number
        elif response.kind == "EXPUNGE":
            self.exists = max(0, self.exists - 1)
        idle = self._idle
        news = response.kind == "EXISTS" or (response.kind == "RECENT" and bool(response.number))
        if idle is not None and not idle.stopping and news:
            self._tell(idle)

    def _uid(self, message: RemoteMessage) -> int:
        validity, _, uid = message.uid.partition(":")
        if validity != str(self.uidvalidity) or not uid.isascii() or not uid.isdigit():
            raise FetchError(
                f"{self.peer}: message {message.uid!r} is not from this folder"
                f" (UIDVALIDITY {self.uidvalidity})"
            )
        return int(uid)

    # -- listing and fetching -----------------------------------------------------------------------

    async def _list(self) -> list[RemoteMessage]:
        await self.done()
        self._new_mail = False
        if self.exists == 0:
            return []
        answer = await self.protocol.command([b"UID FETCH 1:* (UID RFC822.SIZE)"], "listing the messages")
        if not answer.ok:
            raise FetchError(f"{self.peer} could not list {self.folder!r}: {answer.status.text}")
        found: dict[int, RemoteMessage] = {}
        for response in answer.data("FETCH"):
            attributes = fetch_attributes(response)
            if "UID" not in attributes or "RFC822.SIZE" not in attributes:
                continue  # a flag change someone else made, reported on the way
            uid = number_value(attributes["UID"], "UID")
            size = number_value(attributes["RFC822.SIZE"], "RFC822.SIZE")
            found[uid] = RemoteMessage(f"{self.uidvalidity}:{uid}", size, response.number or 0)
        return sorted(found.values(), key=lambda message: (message.number, message.uid))

    async def _retrieve(self, message: RemoteMessage, write: Writer) -> int:
        uid = self._uid(message)
        await self.done()
        written = [0]
        write_errors: list[Exception] = []

        def counting(piece: bytes) -> None:
            # The rest of the literal still has to be read to stay in step: drop it, report later.
            if write_errors:
                return
            written[0] += len(piece)
            try:
                write(piece)
            except Exception as error:
                write_errors.append(error)

        answer = await self.protocol.command(
            [b"UID FETCH %d (BODY.PEEK[])" % uid], f"fetching message {uid}", sink=counting
        )
        if write_errors:
            raise write_errors[0]
        if not answer.ok:
            raise FetchError(f"{self.peer} could not fetch message {uid}: {answer.status.text}")
        body_seen = False
        for response in answer.data("FETCH"):
            attributes = fetch_attributes(response)
            body = attributes.get("BODY[]", attributes.get("RFC822", ""))
            if body == "":
                continue
            if "UID" in attributes and number_value(attributes["UID"], "UID") != uid:
                if isinstance(body, Streamed):
                    raise ProtocolViolation(f"{self.peer} sent another message's body for {uid}")
                continue
            if body_seen:
                continue
            if isinstance(body, bytes):  # a quoted string, or a literal that could not be streamed
                counting(body)
            elif not isinstance(body, Streamed):
                raise FetchError(f"{self.peer}: message {uid} has no body (NIL): gone meanwhile?")
            body_seen = True
        if not body_seen:
            raise FetchError(f"{self.peer}: message {uid} is no longer in {self.folder!r}")
        return written[0]

    # -- deleting, moving, closing ------------------------------------------------------------------

    async def _move(self, messages: list[RemoteMessage], folder: str) -> None:
        uids = [self._uid(message) for message in messages]
        if not uids:
            return
        await self.done()
        name = encode_folder(folder).encode("ascii")
        target = quoted(name) or name
        verb = b"UID MOVE " if "MOVE" in self.capabilities else b"UID COPY "
        for uid_set in _uid_sets(uids):
            what = f"moving messages to {folder!r}"
            answer = await self.protocol.command([verb, uid_set, b" ", target], what)
            if not answer.ok and answer.status.code == "TRYCREATE":
                created = await self.protocol.command([b"CREATE ", target], f"creating the folder {folder!r}")
                if not created.ok:
                    raise FetchError(
                        f"{self.peer} cannot create the folder {folder!r}: {created.status.text}"
                    )
                answer = await self.protocol.command([verb, uid_set, b" ", target], what)
            if not answer.ok:
                raise FetchError(f"{self.peer} could not move messages to {folder!r}: {answer.status.text}")
        if verb == b"UID COPY ":
            self._deleted.update(uids)

    async def _close(self) -> None:
        await self.done()
        self._closing = True
        protocol = self.protocol
        if self._deleted:
            uids = sorted(self._deleted)
            uidplus = "UIDPLUS" in self.capabilities
            for uid_set in _uid_sets(uids):
                answer = await protocol.command(
                    [b"UID STORE ", uid_set, b" +FLAGS.SILENT (\\Deleted)"], "marking messages deleted"
                )
                if not answer.ok:
                    raise FetchError(f"{self.peer} could not mark messages deleted: {answer.status.text}")
                if uidplus:
                    answer = await protocol.command([b"UID EXPUNGE ", uid_set], "expunging messages")
                    if not answer.ok:
                        raise FetchError(f"{self.peer} could not expunge messages: {answer.status.text}")
            if not uidplus:
                # No UIDPLUS: EXPUNGE also removes what others marked \Deleted in this folder.
                answer = await protocol.command([b"EXPUNGE"], "expunging messages")
                if not answer.ok:
                    raise FetchError(f"{self.peer} could not expunge messages: {answer.status.text}")
            self._deleted.clear()
        protocol.logging_out = True
        with contextlib.suppress(FetchError):  # all that mattered is done; hanging up early is fine
            await protocol.command([b"LOGOUT"], "logging out")
        if protocol.transport is not None and not protocol.closed:
            protocol.transport.loseConnection()

    # -- IDLE ---------------------------------------------------------------------------------------

    def _start_idle(self, idle: _Idle) -> None:
        idle.idling = False
        idle.renewing = False
        idle.done_sent = False

        def entered(_request: ContinuationRequest) -> None:
            if idle.idling:
                raise ProtocolViolation(f"{self.peer} sent a second continuation in IDLE")
            idle.idling = True
            self.protocol.stop_timer()
            if idle.stopping:
                self._send_done(idle)
                return
            idle.renewal = self.clock.callLater(IDLE_RENEWAL, self._renew, idle)
            if self._new_mail:
                self._tell(idle)

        idle.command = self.protocol.command([b"IDLE"], "starting IDLE", on_continuation=entered)
        idle.command.addCallbacks(
            lambda answer: self._idle_answered(idle, answer), lambda f: self._idle_failed(idle, f)
        )

    def _idle_answered(self, idle: _Idle, answer: Completion) -> None:
        self._cancel_renewal(idle)
        if not answer.ok:
            self._end_idle_state(FetchError(f"{self.peer} refused IDLE: {answer.status.text}"))
        elif idle.renewing and not idle.stopping:
            self._start_idle(idle)
        else:
            self._end_idle_state(None)

    def _idle_failed(self, idle: _Idle, failure: Failure) -> None:
        error = failure.value if isinstance(failure.value, FetchError) else FetchError(str(failure.value))
        self._end_idle_state(error)

    def _end_idle_state(self, error: FetchError | None) -> None:
        idle, self._idle = self._idle, None
        if idle is None:
            return
        self._cancel_renewal(idle)
        waiters, idle.done_waiters = idle.done_waiters, []
        for waiter in [idle.ended, *waiters]:
            if waiter.called:
                continue
            if error is None or waiter is not idle.ended:
                waiter.callback(None)  # done() succeeds once IDLE is over, however it ended
            else:
                waiter.errback(error)

    def _renew(self, idle: _Idle) -> None:
        idle.renewal = None
        if not idle.stopping:
            idle.renewing = True
            self._send_done(idle)

    def _send_done(self, idle: _Idle) -> None:
        if not idle.done_sent:
            idle.done_sent = True
            self.protocol.send_line(b"DONE", timeout=self.protocol.timeout)

    def _cancel_renewal(self, idle: _Idle) -> None:
        if idle.renewal is not None and idle.renewal.active():
            idle.renewal.cancel()
        idle.renewal = None

    def _tell(self, idle: _Idle) -> None:
        self._new_mail = False
        try:
            idle.on_change()
        except Exception:
            _log.failure("IDLE on_change for {peer} failed", peer=self.peer)


def _uid_sets(uids: Iterable[int]) -> list[bytes]:
    """UIDs as sequence sets, each short enough for one command line."""
    sets: list[bytes] = []
    runs: list[bytes] = []
    size = 0
    for run in sequence_set(uids).split(b","):
        if runs and size + len(run) > MAX_SET_LENGTH:
            sets.append(b",".join(runs))
            runs, size = [], 0
        runs.append(run)
        size += len(run) + 1
    sets.append(b",".join(runs))
    return sets


def _failed(error: FetchError) -> Deferred[None]:
    failed: Deferred[None] = Deferred()
    failed.errback(error)
    return failed
