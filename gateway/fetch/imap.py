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
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
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
from gateway.fetch._connect import client_tls_options, connect, describe
from gateway.fetch._imap_parse import (
    ContinuationRequest,
    DataResponse,
    Streamed,
    encode_folder,
    fetch_attributes,
    number_value,
    quoted,
    sequence_set,
)
from gateway.fetch._imap_wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    IDLE_RENEWAL,
    Completion,
    ImapProtocol,
    astring,
)
from gateway.fetch._token import xoauth2_error, xoauth2_response

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "IDLE_RENEWAL",
    "ImapProtocol",
    "ImapSession",
    "connect_imap",
    "start_session",
]

MAX_SET_LENGTH = 4000  # octets of UIDs in one command; servers limit a command line (Dovecot: 64 KiB)

_log = Logger()


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
