"""TCP_NODELAY on the gateway's connections: replies are not held back for the peer's ACK."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from gateway.smtp.server import ServerSettings
from gateway.tcp import send_at_once
from tests.unit.test_smtp_server import Dialogue


class Recording(StringTransport):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.no_delay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay.append(enabled)


class Wrapping:
    """A TLS layer: no setTcpNoDelay of its own, a TCP transport under it."""

    def __init__(self, inner: Recording) -> None:
        self.transport = inner


def test_the_tcp_transport_and_the_one_under_tls_get_no_delay() -> None:
    plain = Recording()
    send_at_once(plain)
    assert plain.no_delay == [True]
    inner = Recording()
    send_at_once(Wrapping(inner))
    assert inner.no_delay == [True]
    send_at_once(StringTransport())  # no socket: nothing to do, no error


def test_the_smtp_server_switches_nagle_off_for_each_connection() -> None:
    dialogue = Dialogue(ServerSettings())
    transport = Recording()
    transport.peerAddress = dialogue.transport.getPeer()  # type: ignore[no-untyped-call]
    dialogue.factory.buildProtocol(None).makeConnection(transport)  # type: ignore[no-untyped-call]
    assert transport.no_delay == [True]


class RealSocket(TestCase):
    def test_a_real_tcp_connection_gets_tcp_nodelay(self) -> None:
        seen: list[int] = []

        class Server(Protocol):
            def connectionMade(self) -> None:
                send_at_once(self.transport)
                sock = self.transport.getHandle()  # type: ignore[union-attr]
                seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                self.transport.loseConnection()  # type: ignore[union-attr]

        port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        from twisted.internet.task import deferLater

        def check() -> None:
            self.assertEqual(len(seen), 1)
            self.assertNotEqual(seen[0], 0)

        return deferLater(reactor, 0.2, check)  # type: ignore[arg-type,return-value]
