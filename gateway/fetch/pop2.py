"""The POP2 client (RFC 937), for the old servers that still speak it.

`connect_pop2(account, reactor)` connects (port 109, or POP2 over implicit
TLS through `_connect`), reads the "+" greeting, logs in with
``HELO user password`` and fires with a `Pop2Session` (`IMailboxSession`).
POP2 has no STARTTLS and no other login: an account asking for "starttls" is
refused (`TlsRefused`), and plain text needs the account's ``tls = "none"``
(which the config allows only with ``insecure = true``).

POP2 has no unique ids either. Each message's id is the digest of its header
that the POP3 client makes for servers without UIDL (`pop3.header_digest`,
"hdr-<digest>", "-2", "-3"... for identical headers): since POP2 cannot send
a header alone, listing reads every message once (``READ n``, ``RETR``, then
``NACK``, which keeps it), keeping only its header; `retrieve` reads it again.
That doubles the traffic, which the few mailboxes still on POP2 can afford.

Deletion: a message is deleted by ``ACKD``, which POP2 only accepts right
after its ``RETR``, and which also moves on to the next message. So the
session acknowledges a retrieved message only when it moves on (the next
``READ``, or `close`): ``ACKD`` if the poller asked for its deletion by then
(after the message was queued with a 250), ``ACKS`` (kept) otherwise.
Messages marked for deletion that were not just retrieved are read once more
at `close` and answered with ``ACKD``. Then ``QUIT``; `abort` deletes nothing
that was not acknowledged already.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from gateway.fetch import (
    AuthenticationFailed,
    FetchError,
    IMailboxSession,
    MailboxAccount,
    ProtocolViolation,
    RemoteMessage,
    TlsRefused,
)
from gateway.fetch._connect import connect, describe
from gateway.fetch._pop2_wire import Answer, Pop2Wire
from gateway.fetch.pop3 import header_digest

__all__ = ["AUTH_MODES", "Pop2Session", "connect_pop2", "start_session"]

AUTH_MODES = ("auto",)  # HELO user password: POP2 has nothing else
HEAD_LIMIT = 256 * 1024  # octets of a message kept for its id while listing


def connect_pop2(account: MailboxAccount, reactor: IReactorTime) -> Deferred[Pop2Session]:
    """A logged-in POP2 session with the account's mailbox (see the module docstring)."""
    return Deferred.fromCoroutine(_open(account, reactor))


async def _open(account: MailboxAccount, reactor: IReactorTime) -> Pop2Session:
    peer = describe(account)
    if account.tls == "starttls":
        raise TlsRefused(f"{peer}: POP2 has no STARTTLS (use implicit TLS, or none with insecure)")
    wire = await connect(
        account,
        reactor,
        lambda: Pop2Wire(reactor, peer, account.timeout, implicit_tls=account.tls == "implicit"),
    )
    return await start_session(account, wire)


def start_session(account: MailboxAccount, wire: Pop2Wire) -> Deferred[Pop2Session]:
    """Log in on a connected `Pop2Wire` (greeting onwards); the connection is dropped if that fails."""

    async def login() -> Pop2Session:
        session = Pop2Session(account, wire)
        try:
            await session._login()
        except Exception:
            wire.abort()
            raise
        return session

    return Deferred.fromCoroutine(login())


@implementer(IMailboxSession)
class Pop2Session:
    """A logged-in POP2 session with one mailbox (see the module docstring for deletion)."""

    def __init__(self, account: MailboxAccount, wire: Pop2Wire) -> None:
        self.account = account
        self.wire = wire
        self.peer = wire.peer
        self.capabilities: frozenset[str] = frozenset()
        self.count = 0  # messages in the mailbox, from HELO's (or FOLD's) "#n"
        self._pending = 0  # the message just retrieved and not yet acknowledged (0: none)
        self._doomed: set[int] = set()  # marked for deletion
        self._deleted: set[int] = set()  # answered with ACKD
        self._closing = False

    # -- IMailboxSession -------------------------------------------------------------------------------

    def list_messages(self) -> Deferred[list[RemoteMessage]]:
        return Deferred.fromCoroutine(self._list_messages())

    def retrieve(self, message: RemoteMessage, write: Callable[[bytes], None]) -> Deferred[int]:
        return Deferred.fromCoroutine(self._retrieve(self._number(message), write, message.uid))

    def delete(self, messages: list[RemoteMessage]) -> Deferred[None]:
        self._doomed.update(self._number(message) for message in messages)
        return Deferred.fromCoroutine(_nothing())

    def close(self) -> Deferred[None]:
        """Acknowledge the last message, ACKD what is marked, QUIT; fails if the server says "-"."""
        self._closing = True
        return Deferred.fromCoroutine(self._close())

    def abort(self) -> None:
        self.wire.abort()

    # -- login ------------------------------------------------------------------------------------------

    async def _login(self) -> None:
        account, wire = self.account, self.wire
        greeting = await wire.greeting
        if greeting.kind != "+":
            raise FetchError(f"{self.peer} refused the session: {greeting.text or greeting.kind}")
        if account.tls == "implicit":
            await wire.handshake()
        if not wire.tls.secure and account.tls != "none":
            raise TlsRefused(f"{self.peer}: TLS is not up; no password is sent in plain text")
        if account.auth not in AUTH_MODES:
            raise FetchError(f"POP2 login {account.auth!r} unknown (POP2 has HELO only)")
        username = account.username.encode("utf-8")
        password = account.password.encode("utf-8")
        if any(char in username + password for char in b" \t\r\n\0") or not username or not password:
            raise AuthenticationFailed(
                f"{self.peer}: POP2's HELO cannot carry a user name or password with blanks or line breaks"
            )
        answer = await wire.command(b"HELO " + username + b" " + password, "HELO")
        if answer.kind != "#":
            raise AuthenticationFailed(
                f"{self.peer} refused the login of {account.username!r}: {answer.text or answer.kind}"
            )
        self.count = answer.number
        if account.folder and account.folder.upper() != "INBOX":
            folder = account.folder.encode("utf-8")
            if any(char in folder for char in b" \t\r\n\0"):
                raise FetchError(f"{self.peer}: POP2's FOLD cannot name {account.folder!r}")
            answer = await wire.command(b"FOLD " + folder, "FOLD")
            if answer.kind != "#":
                raise FetchError(f"{self.peer} refused FOLD {account.folder!r}: {answer.text or answer.kind}")
            self.count = answer.number

    # -- messages ---------------------------------------------------------------------------------------

    async def _list_messages(self) -> list[RemoteMessage]:
        messages: list[RemoteMessage] = []
        seen: dict[str, int] = {}
        for number in range(1, self.count + 1):
            head = _Head()
            size = await self._read(number)
            if size == 0:
                continue  # gone (or empty): nothing to fetch
            await self.wire.command(b"RETR", f"RETR {number} (its header, for its id)", size, head)
            self._pending = number
            await self._move_on(keep_only=True)
            digest = "hdr-" + header_digest(head.header())
            seen[digest] = seen.get(digest, 0) + 1
            uid = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
            messages.append(RemoteMessage(uid=uid, size=size, number=number))
        return messages

    async def _retrieve(self, number: int, write: Callable[[bytes], None], uid: str) -> int:
        size = await self._read(number)
        if size == 0:
            raise FetchError(f"{self.peer}: message {number} (uid {uid}) is no longer there")
        answer = await self.wire.command(b"RETR", f"RETR {number}", size, write)
        self._pending = number
        return answer.number

    async def _read(self, number: int) -> int:
        """Acknowledge the pending message, then READ `number`: its length."""
        await self._move_on()
        answer = await self.wire.command(b"READ %d" % number, f"READ {number}")
        return self._length(answer, f"READ {number}")

    async def _move_on(self, keep_only: bool = False) -> None:
        """Answer the message just retrieved: ACKD if marked for deletion, else ACKS (NACK while listing)."""
        number, self._pending = self._pending, 0
        if not number:
            return
        if keep_only:
            verb = b"NACK"
        elif number in self._doomed:
            verb = b"ACKD"
        else:
            verb = b"ACKS"
        stage = f"{verb.decode()} {number}"
        self._length(await self.wire.command(verb, stage), stage)
        if verb == b"ACKD":
            self._deleted.add(number)

    async def _close(self) -> None:
        await self._move_on()
        for number in sorted(self._doomed - self._deleted):
            size = await self._read(number)
            if size == 0:
                continue  # already gone
            await self.wire.command(b"RETR", f"RETR {number} (to delete it)", size, _discard)
            self._pending = number
            await self._move_on()
        answer = await self.wire.command(b"QUIT", "QUIT (committing deletions)")
        self.wire.close()
        if answer.kind != "+":
            raise FetchError(
                f"{self.peer} answered QUIT with {answer.kind} (deletions not done): {answer.text}"
            )

    def _length(self, answer: Answer, stage: str) -> int:
        if answer.kind == "=":
            return answer.number
        if answer.kind == "-":
            raise FetchError(f"{self.peer} refused {stage}: {answer.text or '-'}")
        raise ProtocolViolation(f"{self.peer} answered {stage} with {answer.kind!r}, not =length")

    def _number(self, message: RemoteMessage) -> int:
        if message.number < 1:
            raise FetchError(
                f"{self.peer}: message {message.uid!r} has no number in this session (list it first)"
            )
        if self._closing:
            raise FetchError(f"session with {self.peer} is closing")
        return message.number


class _Head:
    """A writer keeping the header of a message (up to HEAD_LIMIT octets), dropping the rest."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.kept = 0

    def __call__(self, piece: bytes) -> None:
        if self.kept < HEAD_LIMIT:
            self.pieces.append(piece[: HEAD_LIMIT - self.kept])
            self.kept += len(self.pieces[-1])

    def header(self) -> bytes:
        return b"".join(self.pieces)


def _discard(piece: bytes) -> None:
    pass


async def _nothing() -> None:
    return None
