"""The fetch clients' connection and TLS set-up: real OpenSSL handshakes in memory (iosim).

A throwaway CA and a server certificate for "localhost"/127.0.0.1 are made here with
`cryptography`; the client side is what `client_tls_options` gives for an account, and
a `TlsStage` says what a lost connection meant.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from gateway.fetch import FetchError, MailboxAccount, TlsRefused
from gateway.fetch._connect import TlsStage, client_tls_options, connect, describe

# Twisted's certificate classes still hand pyOpenSSL objects to pyOpenSSL; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


@attrs.frozen
class Pki:
    ca_file: str
    server: ssl.PrivateCertificate
    stranger: ssl.PrivateCertificate  # a certificate for "localhost" from another, unknown CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _leaf(ca_name: str, ca_key: ec.EllipticCurvePrivateKey) -> ssl.PrivateCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _issue("localhost", key, ca_name, ca_key, ca=False)
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    loaded: ssl.PrivateCertificate = ssl.PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]
    return loaded


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("Test CA", ca_key, "Test CA", ca_key, ca=True)
    ca_file = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    other_key = ec.generate_private_key(ec.SECP256R1())
    return Pki(str(ca_file), _leaf("Test CA", ca_key), _leaf("Other CA", other_key))


def account(**changes: Any) -> MailboxAccount:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 995, "username": "alice", "tls": "implicit"}
    values.update(changes)
    return MailboxAccount(**values)


class Client(Protocol):
    """Records what a fetch client would see: data, the handshake, the loss and what it means."""

    def __init__(self) -> None:
        self.stage = TlsStage("127.0.0.1:995")
        self.stage.implicit()
        self.received = b""
        self.error: FetchError | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def handshakeCompleted(self) -> None:
        self.stage.completed()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.error = self.stage.lost_error(reason, "receiving the greeting")


class Greeter(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"+OK ready\r\n")


@implementer(IHandshakeListener)
class _HandshakeClient(Client):
    pass


def handshake(server: ssl.PrivateCertificate, options: Any) -> Client:
    """One TLS connection in memory between a greeting server and a `Client`."""
    client = _HandshakeClient()
    clock = Clock()  # TLSMemoryBIOProtocol gathers small writes until the next reactor turn
    server_options: Any = server.options()  # type: ignore[no-untyped-call]
    server_side = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Greeter), clock=clock)
    client_factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: client), clock=clock)
    fake: Any = iosim
    server_protocol = server_side.buildProtocol(None)
    client_protocol = client_factory.buildProtocol(None)
    pump = fake.connect(
        server_protocol,
        fake.makeFakeServer(server_protocol),
        client_protocol,
        fake.makeFakeClient(client_protocol),
        clock=clock,
    )
    for _ in range(5):
        clock.advance(0)
        pump.flush()
    return client


def test_a_certificate_from_the_ca_for_the_name_is_accepted(pki: Pki) -> None:
    client = handshake(pki.server, client_tls_options(account(ca_file=pki.ca_file, tls_name="localhost")))
    assert client.stage.done and client.received == b"+OK ready\r\n"


def test_the_host_ip_address_is_checked_against_the_ip_sans(pki: Pki) -> None:
    client = handshake(pki.server, client_tls_options(account(ca_file=pki.ca_file)))
    assert client.stage.done and client.received == b"+OK ready\r\n"


def test_a_certificate_for_another_name_is_tls_refused(pki: Pki) -> None:
    client = handshake(
        pki.server, client_tls_options(account(ca_file=pki.ca_file, tls_name="pop.example.net"))
    )
    assert client.received == b"" and not client.stage.done
    assert isinstance(client.error, TlsRefused)
    assert "not valid for pop.example.net" in str(client.error)


def test_a_certificate_from_an_unknown_ca_is_tls_refused(pki: Pki) -> None:
    client = handshake(pki.stranger, client_tls_options(account(ca_file=pki.ca_file, tls_name="localhost")))
    assert client.received == b""
    assert isinstance(client.error, TlsRefused) and "certificate verify failed" in str(client.error)


def test_verification_off_accepts_any_certificate(pki: Pki) -> None:
    client = handshake(pki.stranger, client_tls_options(account(verify=False, tls_name="pop.example.net")))
    assert client.stage.done and client.received == b"+OK ready\r\n"


def test_an_unreadable_ca_file_is_tls_refused_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TlsRefused, match=r"missing\.pem"):
        client_tls_options(account(ca_file=missing))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(TlsRefused, match="no PEM certificate"):
        client_tls_options(account(ca_file=str(empty)))


def test_a_lost_connection_after_the_handshake_is_a_fetch_error_not_tls() -> None:
    stage = TlsStage("pop.test:995")
    stage.implicit()
    stage.completed()
    error = stage.lost_error(Failure(ConnectionResetError("reset by peer")), "RETR 3")  # type: ignore[no-untyped-call]
    assert type(error) is FetchError
    assert str(error) == "lost connection with pop.test:995 while RETR 3 (reset by peer)"


def test_a_plain_connection_cannot_start_tls_without_a_tls_transport() -> None:
    stage = TlsStage("pop.test:110")
    with pytest.raises(TlsRefused):
        stage.start(None, client_tls_options(account(verify=False)))
    assert not stage.started


def test_describe_brackets_ipv6() -> None:
    assert describe(account(host="::1", port=993)) == "[::1]:993"
    assert describe(account(host="pop.example.net", port=110)) == "pop.example.net:110"


def test_connect_goes_to_the_accounts_host_and_port_wrapped_in_tls_when_implicit() -> None:
    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
    connecting = connect(account(port=995, verify=False), reactor, Protocol)
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 995)
    built: Any = factory.buildProtocol(None)
    assert isinstance(built._wrappedProtocol, TLSMemoryBIOProtocol)
    outcome: list[object] = []
    connecting.addBoth(outcome.append)
    assert outcome == []  # not connected yet


def test_connect_is_plain_tcp_for_starttls() -> None:
    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
    connect(account(port=110, tls="starttls"), reactor, Protocol)
    _host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    assert port == 110
    built: Any = factory.buildProtocol(None)
    assert not isinstance(built._wrappedProtocol, TLSMemoryBIOProtocol)


def test_connect_with_an_unknown_tls_mode_fails() -> None:
    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
    failed = connect(account(tls="sometimes"), reactor, Protocol)
    errors: list[Failure] = []
    failed.addErrback(errors.append)
    assert "sometimes" in str(errors[0].value) and reactor.tcpClients == []


def test_a_refused_connection_names_the_server() -> None:
    from twisted.internet.error import ConnectionRefusedError

    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
    connecting = connect(account(port=995, tls="none"), reactor, Protocol)
    _host, _port, factory, _timeout, _bind = reactor.tcpClients[0]
    refused = Failure(ConnectionRefusedError())  # type: ignore[no-untyped-call]
    factory.clientConnectionFailed(None, refused)  # type: ignore[arg-type]
    reactor.advance(1)
    errors: list[Failure] = []
    connecting.addErrback(errors.append)
    assert isinstance(errors[0].value, FetchError)
    assert str(errors[0].value).startswith("cannot connect to 127.0.0.1:995")
