"""Outbound sessions: where to connect (`Target`), opening them (`Dialer`), and
keeping them open between messages (`ConnectionCache`, after Postfix's scache).

Reusing a session saves the TCP and TLS handshakes and the EHLO round trips:
for many small messages to one next hop that is most of the cost. After each
transaction the session is parked for `idle_timeout` seconds; the next
transaction on it starts with RSET (pipelined with MAIL FROM when offered); it
is closed after `max_reuse` transactions or `max_age` seconds.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import attrs
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from gateway.delivery.tls import ClientTls
from gateway.model import Delivery, Recipient
from gateway.smtp._client_protocol import ClientFactory, ClientProtocol
from gateway.smtp.client import (
    AuthCredentials,
    ClientSession,
    ClientSettings,
    Outcome,
    SessionFailure,
    TlsPolicy,
)

log = Logger(namespace="mailgate.smtp.client")


@attrs.frozen
class Target:
    """One server to try: a name (for logs and TLS) and the address to connect to."""

    host: str  # the MX or relay host name, or the address itself for [literals]
    address: str  # an IP address, or a UNIX socket path when `unix`
    port: int = 25
    tls: TlsPolicy = TlsPolicy.MAY
    credentials: AuthCredentials | None = attrs.field(default=None, repr=False)
    lmtp: bool = False
    unix: bool = False

    @property
    def relay(self) -> str:
        """Postfix's relay= text: "mx.example.com[192.0.2.1]:25"."""
        if self.unix:
            return self.address
        return f"{self.host}[{self.address}]:{self.port}"


class ConnectionCache:
    """Idle sessions, per target, ready for the next message."""

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float = 5.0,
        max_reuse: int = 100,
        max_age: float = 300.0,
        max_idle_per_target: int = 32,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_reuse = max_reuse
        self.max_age = max_age
        self.max_idle_per_target = max_idle_per_target
        self._idle: dict[Target, collections.deque[tuple[ClientSession, IDelayedCall]]] = {}

    def take(self, target: Target) -> ClientSession | None:
        """An idle, still-open session to `target`, or None."""
        idle = self._idle.get(target)
        while idle:
            session, timer = idle.pop()  # the most recently used: the least likely to have timed out
            timer.cancel()
            if session.usable:
                if not idle:
                    del self._idle[target]
                return session
        self._idle.pop(target, None)
        return None

    def put(self, target: Target, session: ClientSession) -> None:
        """Park a session after its transaction; closes it if it has done enough."""
        worn = session.transactions >= self.max_reuse or (
            self.clock.seconds() - session.created >= self.max_age
        )
        idle = self._idle.setdefault(target, collections.deque())
        if worn or not session.usable or len(idle) >= self.max_idle_per_target:
            if not idle:
                del self._idle[target]
            session.quit()
            return
        timer = self.clock.callLater(self.idle_timeout, self._expire, target, session)
        idle.append((session, timer))

    def _expire(self, target: Target, session: ClientSession) -> None:
        idle = self._idle.get(target)
        if idle is not None:
            for entry in idle:
                if entry[0] is session:
                    idle.remove(entry)
                    break
            if not idle:
                del self._idle[target]
        session.quit()

    def close_all(self) -> Deferred[object]:
        """QUIT every idle session (on shutdown); fires when all are closed."""
        idle, self._idle = self._idle, {}
        closing: list[Deferred[None]] = []
        for sessions in idle.values():
            for session, timer in sessions:
                if timer.active():
                    timer.cancel()
                closing.append(session.quit())
        return DeferredList(closing)  # type: ignore[return-value]

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._idle.values())


EndpointFor = Callable[[Target], IStreamClientEndpoint]

_CONNECT_ERRORS: dict[type[BaseException], str] = {
    neterror.ConnectionRefusedError: "Connection refused",
    neterror.TCPTimedOutError: "Connection timed out",
    neterror.TimeoutError: "Connection timed out",
    neterror.NoRouteError: "No route to host",
    neterror.DNSLookupError: "Host not found",
}


def _connect_reason(failure: BaseException) -> str:
    for kind, text in _CONNECT_ERRORS.items():
        if isinstance(failure, kind):
            return text
    return str(failure).strip().rstrip(".") or type(failure).__name__


class Dialer:
    """Opens sessions (or takes cached ones) and runs one transaction on one target."""

    def __init__(
        self,
        reactor: object,
        settings: ClientSettings,
        cache: ConnectionCache,
        tls: ClientTls | None = None,
        endpoint_for: EndpointFor | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        self.settings = settings
        self.cache = cache
        self.tls = tls or ClientTls()
        self.endpoint_for = endpoint_for or self._endpoint
        self._live: set[ClientProtocol] = set()  # every open connection, for shutdown

    def _endpoint(self, target: Target) -> IStreamClientEndpoint:
        timeout = int(self.settings.connect_timeout)
        if target.unix:
            return UNIXClientEndpoint(self.reactor, target.address, timeout=timeout)  # type: ignore[no-untyped-call]
        if ":" in target.address:
            return TCP6ClientEndpoint(self.reactor, target.address, target.port, timeout=timeout)  # type: ignore[no-untyped-call]
        return TCP4ClientEndpoint(self.reactor, target.address, target.port, timeout=timeout)

    async def open(self, target: Target, policy: TlsPolicy | None = None) -> ClientSession:
        """A new session to `target`, through greeting, EHLO, TLS and AUTH."""
        policy = target.tls if policy is None else policy
        factory = ClientFactory(self.clock, target.relay, self.settings.helo_timeout)
        try:
            protocol = await self.endpoint_for(target).connect(factory)
        except Exception as error:
            text = f"connect to {target.relay}: {_connect_reason(error)}"
            raise SessionFailure(451, "4.4.1", text, "none") from None
        assert isinstance(protocol, ClientProtocol)
        self._live.add(protocol)
        protocol.when_closed().addCallback(lambda _: self._live.discard(protocol))
        session = ClientSession(
            protocol, self.settings, target.relay, lmtp=target.lmtp, created=self.clock.seconds()
        )
        await session.open(policy, self.tls.options(policy, target.host), target.credentials)
        return session

    async def _fresh(self, target: Target) -> ClientSession:
        try:
            return await self.open(target)
        except SessionFailure as failure:
            if not (failure.tls_failed and target.tls is TlsPolicy.MAY):
                raise
            # opportunistic TLS that fails is no TLS (Postfix does the same)
            log.info("{relay}: {text}; trying again without TLS", relay=target.relay, text=failure.text)
            return await self.open(target, TlsPolicy.NONE)

    async def attempt(
        self, target: Target, delivery: Delivery, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        """One transaction with `target`; raises SessionFailure if it failed as a whole."""
        session = self.cache.take(target)
        if session is not None:
            try:
                outcomes = await session.deliver(
                    delivery.envelope, recipients, delivery.message_path, delivery.size
                )
            except SessionFailure:
                # a cached session the server had closed meanwhile (or that refused its RSET)
                session.abort()
                session = None
            else:
                self._release(target, session)
                return outcomes
        session = await self._fresh(target)
        outcomes = await session.deliver(delivery.envelope, recipients, delivery.message_path, delivery.size)
        self._release(target, session)
        return outcomes

    def _release(self, target: Target, session: ClientSession) -> None:
        if not session.park():
            session.abort()
            return
        self.cache.put(target, session)

    async def close(self) -> None:
        """QUIT every cached session (on shutdown), abort the others that are idle."""
        await self.cache.close_all()
        closing = [protocol.when_closed() for protocol in self._live]
        for protocol in list(self._live):
            if not protocol.busy:  # a QUIT in flight has its answer coming
                protocol.abort()
        await DeferredList(closing)


async def deliver_in_turn(
    dialer: Dialer,
    targets: Sequence[Target],
    delivery: Delivery,
    recipients: Sequence[Recipient],
    results: dict[int, Outcome] | None = None,
) -> dict[int, Outcome]:
    """Try targets in order; each takes the recipients the previous ones could not.

    Returns recipient index -> Outcome for every recipient tried; recipients left
    with `failover` outcomes (or untried, if `targets` is empty) are still open.
    """
    results = {} if results is None else results
    for target in targets:
        pending = [i for i in range(len(recipients)) if i not in results or results[i].failover]
        if not pending:
            break
        batch = [recipients[i] for i in pending]
        try:
            outcomes = await dialer.attempt(target, delivery, batch)
        except SessionFailure as failure:
            for i in pending:
                results[i] = Outcome(failure.result(recipients[i]), failure.failover)
            continue
        for i, outcome in zip(pending, outcomes, strict=True):
            results[i] = outcome
    return results
