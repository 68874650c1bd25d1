"""SMTP callouts: asking an internal server whether it knows an address.

A callout is the start of a transaction that is never finished: EHLO (LHLO for
LMTP), ``MAIL FROM:<>``, ``RCPT TO:<address>``; the reply to RCPT is the answer
(2xx the address exists, 5xx it does not, 4xx or anything going wrong: nobody
knows yet). Postfix's ``reject_unverified_recipient`` asks the same way.

`SmtpProber` asks one server, over the gateway's own SMTP client
(`gateway.smtp.client.ClientSession` for the greeting and EHLO,
`ClientProtocol` for the commands and their timeouts). It opens at most
`concurrency` sessions at once, keeps a session open for `keep_open` seconds
after a callout (the next one starts with RSET, pipelined with MAIL FROM when
the server offers PIPELINING), and never lets callouts pile up without bound:
past `concurrency * QUEUE_PER_SESSION` waiting, the answer is "unverified" at once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from gateway.delivery.router import TransportSpec
from gateway.filters._directory import Answer, Lookup
from gateway.smtp._client_protocol import ClientError, ClientFactory, ClientProtocol
from gateway.smtp.client import ClientSession, ClientSettings, SessionFailure, TlsPolicy
from gateway.smtp.reply import Reply

log = Logger(namespace="mailgate.filter.recipients")

QUEUE_PER_SESSION = 25  # callouts that may wait for a session, per session allowed
MAX_REUSE = 100  # callouts over one session before it is closed


@attrs.frozen
class CalloutServer:
    """The server a callout asks: a TCP host and port, or an LMTP UNIX socket."""

    host: str  # a name or an IP address; the socket path when `unix`
    port: int = 25
    lmtp: bool = False
    unix: bool = False

    @property
    def relay(self) -> str:
        """As Postfix logs a relay: "[192.0.2.10]:25", or the socket path."""
        return self.host if self.unix else f"[{self.host}]:{self.port}"

    @classmethod
    def from_spec(cls, spec: TransportSpec) -> CalloutServer | None:
        """The first host of an smtp or lmtp route; None for mx, relay and maildir."""
        if spec.kind == "lmtp" and spec.path:
            return cls(spec.path, 0, lmtp=True, unix=True)
        if spec.kind in ("smtp", "lmtp") and spec.hosts:
            first = spec.hosts[0]
            return cls(first.host, first.port, lmtp=spec.kind == "lmtp")
        return None


class Prober(Protocol):
    """Asks one server about addresses (`SmtpProber`; fakes in the tests)."""

    def probe(self, address: str) -> Deferred[Lookup]:
        """Fires with VALID, UNKNOWN or UNVERIFIED; never fails."""
        ...


Connector = Callable[[CalloutServer, ClientFactory], Deferred[ClientProtocol]]


def endpoint_connector(reactor: object, connect_timeout: float) -> Connector:
    """Connects to a server with Twisted endpoints, giving up after `connect_timeout`."""
    timeout = max(1, round(connect_timeout))

    def connect(server: CalloutServer, factory: ClientFactory) -> Deferred[ClientProtocol]:
        endpoint: IStreamClientEndpoint
        if server.unix:
            endpoint = UNIXClientEndpoint(reactor, server.host, timeout=timeout)  # type: ignore[no-untyped-call]
        elif isIPAddress(server.host):
            endpoint = TCP4ClientEndpoint(reactor, server.host, server.port, timeout=timeout)
        elif isIPv6Address(server.host):
            endpoint = TCP6ClientEndpoint(reactor, server.host, server.port, timeout=timeout)  # type: ignore[no-untyped-call]
        else:
            endpoint = HostnameEndpoint(reactor, server.host.encode("ascii"), server.port, timeout=timeout)
        connected: Deferred[ClientProtocol] = endpoint.connect(factory)  # type: ignore[assignment]
        return connected

    return connect


class _Broken(Exception):
    """A session that cannot carry this callout (closed, or RSET refused)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class SmtpProber:
    """Asks one server about addresses; `probe()` never fails (see the module docstring)."""

    def __init__(
        self,
        server: CalloutServer,
        clock: IReactorTime,
        connect: Connector,
        *,
        helo_name: str,
        reply_timeout: float = 10.0,
        keep_open: float = 5.0,
        concurrency: int = 4,
    ) -> None:
        self.server = server
        self.clock = clock
        self.connect = connect
        self.settings = ClientSettings(
            helo_name=helo_name,
            helo_timeout=reply_timeout,
            mail_timeout=reply_timeout,
            rcpt_timeout=reply_timeout,
            rset_timeout=reply_timeout,
            quit_timeout=reply_timeout,
        )
        self.keep_open = keep_open
        self.concurrency = concurrency
        self._slots = DeferredSemaphore(concurrency)
        self._idle: collections.deque[tuple[ClientSession, IDelayedCall]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Callouts waiting for a free session."""
        return len(self._slots.waiting)

    @property
    def idle(self) -> int:
        """Sessions kept open for the next callout."""
        return len(self._idle)

    def probe(self, address: str) -> Deferred[Lookup]:
        """Ask about `address`; fires with VALID, UNKNOWN or UNVERIFIED, never fails."""
        if self.waiting >= self.concurrency * QUEUE_PER_SESSION:
            return succeed(Lookup(Answer.UNVERIFIED, f"too many callouts waiting for {self.server.relay}"))
        return self._slots.run(lambda: Deferred.fromCoroutine(self._probe(address)))

    def close(self) -> None:
        """QUIT the sessions kept open (at shutdown)."""
        idle, self._idle = self._idle, collections.deque()
        for session, timer in idle:
            if timer.active():
                timer.cancel()
            session.quit()

    # -- one callout -----------------------------------------------------------------

    async def _probe(self, address: str) -> Lookup:
        session = self._take()
        if session is not None:
            try:
                return await self._ask(session, address)
            except _Broken:
                # a kept session the server had closed meanwhile: ask over a new one
                session.abort()
        try:
            session = await self._open()
        except SessionFailure as failure:
            return Lookup(Answer.UNVERIFIED, failure.text)
        try:
            return await self._ask(session, address)
        except _Broken as broken:
            session.abort()
            return Lookup(Answer.UNVERIFIED, broken.text)

    async def _open(self) -> ClientSession:
        factory = ClientFactory(self.clock, self.server.relay, self.settings.helo_timeout)
        try:
            protocol = await self.connect(self.server, factory)
        except Exception as error:
            reason = str(error).strip().rstrip(".") or type(error).__name__
            raise SessionFailure(451, "4.4.1", f"connect to {self.server.relay}: {reason}", "none") from None
        session = ClientSession(
            protocol, self.settings, self.server.relay, lmtp=self.server.lmtp, created=self.clock.seconds()
        )
        await session.open(TlsPolicy.NONE)
        return session

    async def _ask(self, session: ClientSession, address: str) -> Lookup:
        """MAIL FROM:<> and RCPT TO over `session`; raises _Broken if it cannot carry them."""
        settings = self.settings
        utf8 = not address.isascii()
        if utf8 and "SMTPUTF8" not in session.extensions:
            # the server cannot take mail for it at all: delivery will say so to the sender
            self._release(session)
            return Lookup(Answer.VALID, f"not verified: {self.server.relay} does not offer SMTPUTF8")
        if any(c in address for c in "<>\r\n\0 "):
            self._release(session)
            return Lookup(Answer.UNVERIFIED, f"not asking about an unsafe address {address!r}")
        mail = b"MAIL FROM:<>" + (b" SMTPUTF8" if utf8 else b"")
        commands = [
            (mail, "receiving the MAIL FROM response", settings.mail_timeout),
            (f"RCPT TO:<{address}>".encode(), "receiving the RCPT TO response", settings.rcpt_timeout),
        ]
        rset, session.rset_pending = session.rset_pending, False
        if rset:
            commands.insert(0, (b"RSET", "receiving the RSET response", settings.rset_timeout))
        session.transactions += 1
        protocol = session.protocol
        try:
            if "PIPELINING" in session.extensions:
                replies = await protocol.send_batch(commands)
            else:
                replies = []
                for command in commands:
                    reply = await protocol.command(*command)
                    replies.append(reply)
                    if not reply.is_positive:
                        break
        except ClientError as error:
            raise _Broken(error.text) from None
        if rset:
            if not replies[0].is_positive:
                raise _Broken(_said(self.server.relay, replies[0], "RSET"))
            replies = replies[1:]
        lookup = self._answer(replies)
        self._release(session)
        return lookup

    def _answer(self, replies: list[Reply]) -> Lookup:
        relay = self.server.relay
        mail = replies[0]
        if not mail.is_positive:
            # a server refusing the null sender cannot tell us anything about its users
            return Lookup(Answer.UNVERIFIED, _said(relay, mail, "MAIL FROM"))
        rcpt = replies[1]
        said = _said(relay, rcpt, "RCPT TO")
        if rcpt.is_positive:
            return Lookup(Answer.VALID, said)
        if rcpt.is_permanent:
            return Lookup(Answer.UNKNOWN, said)
        return Lookup(Answer.UNVERIFIED, said)

    # -- sessions kept open -------------------------------------------------------------

    def _take(self) -> ClientSession | None:
        while self._idle:
            session, timer = self._idle.pop()  # the newest: the least likely to have timed out
            timer.cancel()
            if session.usable:
                return session
            session.abort()
        return None

    def _release(self, session: ClientSession) -> None:
        keep = (
            self.keep_open > 0
            and session.usable
            and session.transactions < MAX_REUSE
            and len(self._idle) < self.concurrency
        )
        if not keep:
            session.quit()
            return
        session.rset_pending = True  # the next callout starts with RSET
        timer = self.clock.callLater(self.keep_open, self._expire, session)
        self._idle.append((session, timer))

    def _expire(self, session: ClientSession) -> None:
        for entry in self._idle:
            if entry[0] is session:
                self._idle.remove(entry)
                break
        session.quit()


def _said(relay: str, reply: Reply, command: str) -> str:
    return f"host {relay} said: {reply} (in reply to {command} command)"
