"""The POP3 client (RFC 1939, CAPA and PIPELINING RFC 2449, STLS RFC 2595, codes RFC 3206).

`connect_pop3(account, reactor)` connects, reads the greeting, asks CAPA, starts
TLS (POP3S from the first byte, or STLS; then CAPA again, forgetting what was
said in plain text), logs in, and fires with a `Pop3Session`
(`IMailboxSession`). Written here rather than on `twisted.mail.pop3client`,
which checks no certificate and reads plain text injected after STLS.

Login ("auth" of the account): "user" is USER/PASS, "apop" is APOP (an MD5
digest of the greeting's timestamp and the password; the server must offer a
timestamp). "auto" chooses USER/PASS once TLS is up (APOP adds nothing there,
and servers that keep hashed passwords announce a timestamp yet refuse APOP),
and APOP on a plain-text connection when the server offers it. No password
leaves over plain text unless the account's `tls` is "none" (which the config
allows only with an explicit insecure flag). "-ERR" to the login is
`AuthenticationFailed`, except the RFC 3206 codes that say the account is fine
but busy or the server is in trouble ([IN-USE], [LOGIN-DELAY], [SYS/...]):
those are `FetchError`, retried later without counting as a wrong password.

"xoauth2" is SASL XOAUTH2 (Exchange Online, Gmail) by ``AUTH XOAUTH2`` with
the initial response (RFC 5034; sent after a "+ " when the line would pass
255 octets): the account's `password` is then the OAuth 2 access token (the
poller runs the account's token command for it at each login). The server's
error continuation (base64 JSON) is answered with an empty line, and the
login fails as `AuthenticationFailed`.

Servers without CAPA (old ones answer -ERR) are served without pipelining or
STLS (STLS is still tried when the account asks for it: -ERR is `TlsRefused`).

Unique ids: UIDL. When a server has no UIDL, or its listing is broken (ids
missing, duplicated, malformed, or for numbers LIST does not have), each
message's id is made from its header instead: a SHA-256 digest of `TOP n 0`
without the headers some servers rewrite on reading (Status, X-Status,
X-UIDL, X-Keywords, X-IMAP*, Content-Length, Lines), as "hdr-<digest>", with
"-2", "-3"... for identical headers further down the maildrop. Such ids stay
the same across sessions as long as the messages and their order do; a
server with neither UIDL nor TOP cannot be fetched from without duplicates,
so it is refused (`FetchError`).

SDPS (Demon Internet's extension, for multidrop mailboxes): `envelope(message)`
sends ``*ENV n`` and reads the multi-line answer the way fetchmail does (the
reference since Demon's description went offline): its third line is the
envelope sender (blank for <>), its fourth the recipient (several, separated
by commas or blanks, are all taken); other lines are not used.

Deletions (DELE) are only committed by the "+OK" to QUIT (`close`); `abort`
or a lost connection deletes nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
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
)
from gateway.fetch._connect import client_tls_options, connect, describe
from gateway.fetch._pop3_wire import Pop3Wire, Response
from gateway.fetch._token import xoauth2_error, xoauth2_response

__all__ = ["AUTH_MODES", "Pop3Session", "connect_pop3", "header_digest", "start_session"]

AUTH_MODES = ("auto", "user", "apop", "xoauth2")

_log = Logger()
T = TypeVar("T")

# RFC 1939 7: the timestamp is a msg-id, "<process-ID.clock@hostname>"
_TIMESTAMP = re.compile(rb"<[^<>\s@]*@[^<>\s]*>")
# RFC 3206: the login was refused for a reason other than the credentials
_NOT_CREDENTIALS = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM")
# RFC 1939 7: a unique-id is 1 to 70 characters 0x21..0x7E; some servers use longer ones
_UID = re.compile(rb"[\x21-\x7e]{1,255}")
# Headers that servers add or change when a message is read (mbox-based ones do): not in the digest.
_REWRITTEN = re.compile(rb"(?i)(status|x-status|x-uidl|x-keywords|x-imap[\w-]*|content-length|lines)\s*:")
_MAX_AUTH_LINE = 253  # RFC 5034 4: an AUTH command line is at most 255 octets with its CRLF
_GROWTH = 1024 * 1024  # a message may come a little larger than LIST said (LF counted as CRLF, ...)


def connect_pop3(account: MailboxAccount, reactor: IReactorTime) -> Deferred[Pop3Session]:
    """A logged-in POP3 session with the account's maildrop (see the module docstring)."""
    return Deferred.fromCoroutine(_open(account, reactor))


async def _open(account: MailboxAccount, reactor: IReactorTime) -> Pop3Session:
    peer = describe(account)
    wire = await connect(
        account,
        reactor,
        lambda: Pop3Wire(reactor, peer, account.timeout, implicit_tls=account.tls == "implicit"),
    )
    return await start_session(account, wire)


def start_session(account: MailboxAccount, wire: Pop3Wire) -> Deferred[Pop3Session]:
    """Log in on a connected `Pop3Wire` (greeting onwards); the connection is dropped if that fails."""

    async def login() -> Pop3Session:
        session = Pop3Session(account, wire)
        try:
            if account.auth not in AUTH_MODES:
                raise FetchError(f"POP3 login {account.auth!r} unknown (one of {', '.join(AUTH_MODES)})")
            await session._login()
        except Exception:  # not GeneratorExit: a login dropped unfinished is collected quietly
            wire.abort()
            raise
        return session

    return Deferred.fromCoroutine(login())


def _all(requests: list[Deferred[T]]) -> Deferred[list[T]]:
    """Every result, in order; the first failure if any failed (the others' are consumed)."""

    def collect(results: list[tuple[bool, Any]]) -> list[T]:
        for ok, value in results:
            if not ok:
                assert isinstance(value, Failure)
                value.raiseException()
        return [value for _ok, value in results]

    done: Deferred[list[tuple[bool, Any]]] = DeferredList(requests, consumeErrors=True)
    return done.addCallback(collect)


def _text(response: Response) -> str:
    return f"[{response.code}] {response.text}" if response.code else response.text


@implementer(IMailboxSession)
class Pop3Session:
    """A logged-in POP3 session (TRANSACTION state) with one maildrop."""

    def __init__(self, account: MailboxAccount, wire: Pop3Wire) -> None:
        self.account = account
        self.wire = wire
        self.peer = wire.peer
        self.capabilities: frozenset[str] = frozenset()
        self.capa_known = False
        self.header_ids = False  # ids made from headers (no usable UIDL), see the module docstring
        self._closing = False

    def has(self, capability: str) -> bool:
        """Did CAPA list this capability (its first word, e.g. "SASL" of "SASL PLAIN")?"""
        return any(line.split(" ", 1)[0] == capability for line in self.capabilities)

    # -- IMailboxSession -------------------------------------------------------------------------------

    def list_messages(self) -> Deferred[list[RemoteMessage]]:
        return Deferred.fromCoroutine(self._list_messages())

    def retrieve(self, message: RemoteMessage, write: Callable[[bytes], None]) -> Deferred[int]:
        number = self._number(message)
        stage = f"RETR {number}"

        def check(response: Response) -> int:
            if not response.ok:
                raise FetchError(f"{self.peer} refused RETR {number} (uid {message.uid}): {_text(response)}")
            return response.octets

        return self.wire.command(
            b"RETR %d" % number,
            stage,
            multiline=True,
            sink=write,
            limit=max(2 * message.size, message.size + _GROWTH),
        ).addCallback(check)

    def top(self, message: RemoteMessage, lines: int, write: Callable[[bytes], None]) -> Deferred[int]:
        """The header and the first `lines` body lines (TOP), to `write`; the octet count."""
        number = self._number(message)

        def check(response: Response) -> int:
            if not response.ok:
                raise FetchError(f"{self.peer} refused TOP {number}: {_text(response)}")
            return response.octets

        return self.wire.command(
            b"TOP %d %d" % (number, lines),
            f"TOP {number}",
            multiline=True,
            sink=write,
            limit=max(2 * message.size, message.size + _GROWTH),
        ).addCallback(check)

    def envelope(self, message: RemoteMessage) -> Deferred[tuple[str, tuple[str, ...]]]:
        """SDPS: the envelope (sender, recipients) the server kept for `message` (``*ENV n``).

        The sender is "" for <>; `FetchError` if the server refuses (no SDPS there).
        """
        number = self._number(message)

        def parse(response: Response) -> tuple[str, tuple[str, ...]]:
            if not response.ok:
                raise FetchError(f"{self.peer} refused *ENV {number} (no SDPS?): {_text(response)}")
            lines = [line.decode("utf-8", "replace").strip() for line in response.lines]
            if len(lines) < 4:
                raise ProtocolViolation(
                    f"{self.peer} answered *ENV {number} with {len(lines)} lines (SDPS gives at least 4)"
                )
            sender = _bare(lines[2])
            recipients = tuple(_bare(part) for part in re.split(r"[,\s]+", lines[3]) if _bare(part))
            return sender, recipients

        return self.wire.command(b"*ENV %d" % number, f"*ENV {number}", multiline=True).addCallback(parse)

    def delete(self, messages: list[RemoteMessage]) -> Deferred[None]:
        numbers = [self._number(message) for message in messages]

        def check(responses: list[Response]) -> None:
            for number, response in zip(numbers, responses, strict=True):
                if not response.ok:
                    raise FetchError(f"{self.peer} refused DELE {number}: {_text(response)}")

        return _all(
            [self.wire.command(b"DELE %d" % number, f"DELE {number}") for number in numbers]
        ).addCallback(check)

    def close(self) -> Deferred[None]:
        """QUIT; fires once the server said +OK (its deletions are then done), fails otherwise."""
        self._closing = True

        def check(response: Response) -> None:
            self.wire.close()
            if not response.ok:
                raise FetchError(
                    f"{self.peer} answered QUIT with -ERR (deletions not done): {_text(response)}"
                )

        return self.wire.command(b"QUIT", "QUIT (committing deletions)").addCallback(check)

    def abort(self) -> None:
        self.wire.abort()

    # -- login ------------------------------------------------------------------------------------------

    async def _login(self) -> None:
        account, wire = self.account, self.wire
        greeting = await wire.greeting
        if not greeting.ok:
            raise FetchError(f"{self.peer} refused the session: {_text(greeting)}")
        found = _TIMESTAMP.search(greeting.text.encode("utf-8", "replace"))
        timestamp = found.group(0) if found else None
        await self._capa()
        if account.tls == "starttls":
            if self.capa_known and not self.has("STLS"):
                raise TlsRefused(
                    f"{self.peer} does not offer STLS (its CAPA: {', '.join(sorted(self.capabilities))})"
                )
            response = await wire.command(b"STLS", "STLS", tls=client_tls_options(account))
            if not response.ok:
                raise TlsRefused(f"{self.peer} refused STLS: {_text(response)}")
            await wire.handshake()
            await self._capa()  # RFC 2595 4: what was said before TLS is forgotten
        elif account.tls == "implicit":
            await wire.handshake()
        if not wire.tls.secure and account.tls != "none":
            raise TlsRefused(f"{self.peer}: TLS is not up; no password is sent in plain text")
        await self._authenticate(timestamp)
        if self.has("PIPELINING"):
            wire.pipelining = True

    async def _capa(self) -> None:
        response = await self.wire.command(b"CAPA", "CAPA", multiline=True)
        self.capa_known = response.ok
        self.capabilities = frozenset(
            " ".join(line.decode("ascii", "replace").split()).upper()
            for line in response.lines
            if line.strip()
        )

    async def _authenticate(self, timestamp: bytes | None) -> None:
        account, wire = self.account, self.wire
        username = account.username.encode("utf-8")
        password = account.password.encode("utf-8")
        if any(char in username + password for char in b"\r\n\0"):
            raise AuthenticationFailed(f"{self.peer}: the user name or password contains a line break or NUL")
        mode = account.auth
        if mode == "auto":
            offers_user = not self.capa_known or self.has("USER")
            apop = timestamp is not None and (not wire.tls.secure or not offers_user)
            mode = "apop" if apop else "user"
        if mode == "xoauth2":
            response = await self._xoauth2()
        elif mode == "apop":
            if timestamp is None:
                raise AuthenticationFailed(f"{self.peer} offers no APOP (no timestamp in its greeting)")
            digest = hashlib.md5(timestamp + password, usedforsecurity=False).hexdigest().encode("ascii")
            response = await wire.command(b"APOP " + username + b" " + digest, "APOP")
        else:
            response = await wire.command(b"USER " + username, "USER")
            if response.ok:
                response = await wire.command(b"PASS " + password, "PASS")
        if not response.ok:
            text = f"{self.peer} refused the login of {account.username!r}: {_text(response)}"
            if response.code in _NOT_CREDENTIALS:
                raise FetchError(text)
            raise AuthenticationFailed(text)

    async def _xoauth2(self) -> Response:
        wire = self.wire
        initial = xoauth2_response(self.account.username, self.account.password)
        if len(b"AUTH XOAUTH2 " + initial) <= _MAX_AUTH_LINE:
            response = await wire.command(b"AUTH XOAUTH2 " + initial, "AUTH XOAUTH2", sasl=True)
        else:  # RFC 5034 4: too long for the AUTH line, sent as the answer to an empty challenge
            response = await wire.command(b"AUTH XOAUTH2", "AUTH XOAUTH2", sasl=True)
            if response.more:
                response = await wire.command(initial, "AUTH XOAUTH2 (the token)", sasl=True)
        if response.more:  # the error, as base64 JSON; the exchange ends with an empty answer
            detail = xoauth2_error(response.text)
            await wire.command(b"", "AUTH XOAUTH2 (ending it)", sasl=True)
            raise AuthenticationFailed(
                f"{self.peer} refused the XOAUTH2 login of {self.account.username!r}: {detail}"
            )
        return response

    # -- listing ----------------------------------------------------------------------------------------

    async def _list_messages(self) -> list[RemoteMessage]:
        requests = [self.wire.command(b"LIST", "LIST", multiline=True)]
        if not self.header_ids:
            requests.append(self.wire.command(b"UIDL", "UIDL", multiline=True))
        responses = await _all(requests)
        listing = responses[0]
        if not listing.ok:
            raise FetchError(f"{self.peer} refused LIST: {_text(listing)}")
        sizes = self._sizes(listing.lines)
        uids = None if self.header_ids else self._uids(responses[1], sizes)
        if uids is None:
            if not self.header_ids:
                _log.warn(
                    "{peer}: UIDL missing or broken for {user}; ids are made from each message's headers",
                    peer=self.peer,
                    user=self.account.username,
                )
            self.header_ids = True
            uids = await self._header_uids(sizes)
        return [RemoteMessage(uid=uids[number], size=size, number=number) for number, size in sizes.items()]

    def _sizes(self, lines: Iterable[bytes]) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for line in lines:
            fields = line.split()
            if (
                len(fields) < 2
                or not fields[0].isdigit()
                or not fields[1].isdigit()
                or int(fields[0]) in sizes
            ):
                raise ProtocolViolation(f"{self.peer} sent a malformed LIST line: {line[:80]!r}")
            sizes[int(fields[0])] = int(fields[1])
        return sizes

    def _uids(self, response: Response, sizes: dict[int, int]) -> dict[int, str] | None:
        """The UIDL listing if it is usable: one well-formed, unique id for each listed number."""
        if not response.ok:
            return None
        uids: dict[int, str] = {}
        for line in response.lines:
            fields = line.split()
            if len(fields) != 2 or not fields[0].isdigit() or not _UID.fullmatch(fields[1]):
                return None
            number = int(fields[0])
            if number in uids or number not in sizes:
                return None
            uids[number] = fields[1].decode("ascii")
        if len(uids) != len(sizes) or len(set(uids.values())) != len(uids):
            return None
        return uids

    async def _header_uids(self, sizes: dict[int, int]) -> dict[int, str]:
        headers: dict[int, list[bytes]] = {number: [] for number in sizes}
        listed = list(sizes.items())

        def top(number: int, size: int) -> Deferred[int]:
            return self.top(RemoteMessage(uid="", size=size, number=number), 0, headers[number].append)

        try:
            if listed:  # a server without TOP is asked once, not once per message
                await top(*listed[0])
            await _all([top(number, size) for number, size in listed[1:]])
        except FetchError as error:
            if isinstance(error, ProtocolViolation) or self.wire.closed:
                raise
            raise FetchError(
                f"{self.peer} has no usable UIDL and refuses TOP, so its messages cannot be told apart"
                f" (fetching would make duplicates): {error}"
            ) from error
        seen: dict[str, int] = {}
        uids: dict[int, str] = {}
        for number in sizes:
            digest = "hdr-" + header_digest(b"".join(headers[number]))
            seen[digest] = seen.get(digest, 0) + 1
            uids[number] = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
        return uids

    def _number(self, message: RemoteMessage) -> int:
        if message.number < 1:
            raise FetchError(
                f"{self.peer}: message {message.uid!r} has no number in this session (list it first)"
            )
        if self._closing:
            raise FetchError(f"session with {self.peer} is closing")
        return message.number


def _bare(address: str) -> str:
    """An address without its angle brackets ("" for <> or a blank)."""
    return address.strip().strip("<>").strip()


def header_digest(header: bytes) -> str:
    """SHA-256 (hex, 48 digits) of a header without the fields servers rewrite on reading."""
    digest = hashlib.sha256()
    skipping = False
    for line in header.split(b"\r\n"):
        if not line:
            break  # the end of the header (TOP n 0 may send the empty line)
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                digest.update(line + b"\n")
            continue
        skipping = bool(_REWRITTEN.match(line))
        if not skipping:
            digest.update(line + b"\n")
    return digest.hexdigest()[:48]
