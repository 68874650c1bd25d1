"""Fakes for tests of the scanner clients and the filters using them: an endpoint in memory.

`MemoryEndpoint` records each connection attempt (`attempts`) instead of
connecting. A test then makes the attempt succeed (the protocol is connected to
a `StringTransport`), or fail, or never answer, reads what the client sent
(`Attempt.sent()`, which also runs a registered producer to its end), and plays
the daemon's answer (`Attempt.answer()`), typically a transcript recorded from
the real daemon.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer


class Attempt:
    """One connection the client asked for."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: Deferred[Any] = Deferred(self._cancel)
        self.protocol: Any = None
        self.transport: StringTransport | None = None

    def _cancel(self, _: Deferred[Any]) -> None:
        self.cancelled = True

    def succeed(self) -> StringTransport:
        """The daemon accepts: the protocol is connected (and sends its request)."""
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 783))
        self.transport = StringTransport()  # type: ignore[no-untyped-call]
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)
        return self.transport

    def refuse(self) -> None:
        self.deferred.errback(ConnectionRefusedError("connection refused"))  # type: ignore[no-untyped-call]

    def sent(self, limit: int = 1 << 30) -> bytes:
        """What the client wrote, once its producer (if any) has written up to `limit` bytes."""
        assert self.transport is not None, "not connected"
        while self.transport.producer is not None and len(self._value()) < limit:
            self.transport.producer.resumeProducing()
        return self._value()

    def _value(self) -> bytes:
        assert self.transport is not None
        return bytes(self.transport.value())  # type: ignore[no-untyped-call]

    def answer(self, reply: bytes, close: bool = True) -> None:
        """The daemon's answer, then (`close`) it closes the connection, as spamd and clamd do."""
        assert self.protocol is not None, "not connected"
        self.protocol.dataReceived(reply)
        if close:
            self.close()

    def close(self, clean: bool = True) -> None:
        """The daemon closes (or, `clean` False, dies: the connection is lost)."""
        if self.protocol is None or self.closed:
            return
        assert self.transport is not None
        self.transport.disconnecting = True
        reason = ConnectionDone("closed") if clean else ConnectionLost("killed")
        self.protocol.connectionLost(Failure(reason))  # type: ignore[no-untyped-call]
        self.protocol = None

    @property
    def closed(self) -> bool:
        return self.protocol is None and self.transport is not None

    @property
    def dropped(self) -> bool:
        """The client closed or aborted its side."""
        return self.transport is not None and bool(self.transport.disconnecting)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """An endpoint that records connection attempts; `auto` connects each one at once.

    `script` plays the daemon for the filters' tests: one entry per connection, in
    order — bytes: connect, take the whole request, answer that and close; an
    exception: the connection fails with it; None: connect and never answer.
    """

    def __init__(self, auto: bool = False, script: list[bytes | Exception | None] | None = None) -> None:
        self.auto = auto
        self.script = list(script) if script is not None else None
        self.attempts: list[Attempt] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        attempt = Attempt(protocolFactory)
        self.attempts.append(attempt)
        if self.script is not None:
            assert self.script, "the client connected more often than the test scripted"
            entry = self.script.pop(0)
            if isinstance(entry, Exception):
                attempt.deferred.errback(entry)
                return attempt.deferred
            attempt.succeed()
            if entry is not None:
                attempt.sent()
                attempt.answer(entry)
        elif self.auto:
            attempt.succeed()
        return attempt.deferred

    @property
    def last(self) -> Attempt:
        return self.attempts[-1]

    def requests(self) -> list[bytes]:
        """What the client sent on each connection so far."""
        return [attempt.sent() if attempt.transport is not None else b"" for attempt in self.attempts]
