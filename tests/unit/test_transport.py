"""The SMTP, MX and LMTP transports over real loopback TCP, against the gateway's
own SMTP server (PIPELINING, RSET, STARTTLS, AUTH) and small scripted servers."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from gateway.delivery.connections import ConnectionCache, Dialer
from gateway.delivery.lmtp import LmtpTransport
from gateway.delivery.resolver import DnsTemporaryError, StaticResolver
from gateway.delivery.smtp import MxTransport, SmtpTransport
from gateway.delivery.tls import ClientTls
from gateway.model import Delivery, Envelope, Recipient, RecipientResult
from gateway.smtp.auth import FileCredentials, hash_password
from gateway.smtp.client import AuthCredentials, ClientSettings, TlsPolicy
from gateway.smtp.reply import Reply
from gateway.smtp.server import ServerSettings, SmtpServerFactory
from gateway.testing import RecordingReception

MESSAGE = b"Subject: test\r\n\r\n.hidden line\r\nbody\r\n"


def certificate_pem(name: str = "mx.test") -> tuple[bytes, bytes]:
    """(key + certificate PEM, certificate PEM), self-signed, with a DNS SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    return key_pem + cert_pem, cert_pem


class Greeter(Protocol):
    """A server that greets with a fixed reply and hangs up."""

    reply = b"421 4.3.2 busy, try later\r\n"

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.reply)
        self.transport.loseConnection()


class CountingFactory(SmtpServerFactory):
    connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TransportTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp()
        self.message_path = os.path.join(self.tmp, "message")
        with open(self.message_path, "wb") as f:
            f.write(MESSAGE)
        self.key_and_cert, self.cert = certificate_pem()
        self.ca_file = os.path.join(self.tmp, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(self.cert)
        self.cache = ConnectionCache(reactor, idle_timeout=5.0)
        self.settings = ClientSettings("gw.test", connect_timeout=5, helo_timeout=10)
        self.dialer = Dialer(reactor, self.settings, self.cache, ClientTls(self.ca_file))
        self.addCleanup(lambda: ensureDeferred(self.dialer.close()))
        self.resolver = StaticResolver({"mx.test": {"A": ["127.0.0.1"]}})

    def server(
        self, *, tls: bool = False, credentials: FileCredentials | None = None
    ) -> tuple[int, RecordingReception, CountingFactory]:
        reception = RecordingReception()
        factory = CountingFactory(
            ServerSettings(hostname="mx.test", auth_failure_delay=0.1),
            reception,
            clock=reactor,
            tls_context=PrivateCertificate.loadPEM(self.key_and_cert).options() if tls else None,  # type: ignore[no-untyped-call]
            credentials=credentials,
            listener="tcp:0",
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, reception, factory  # type: ignore[attr-defined]

    def scripted(self, reply: bytes) -> int:
        factory = ServerFactory.forProtocol(Greeter)
        factory.protocol = type("G", (Greeter,), {"reply": reply})
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)  # type: ignore[attr-defined]

    def delivery(self, *addresses: str, sender: str = "a@example.org") -> Delivery:
        recipients = tuple(Recipient(a) for a in addresses or ("b@example.net",))
        return Delivery("Q1", Envelope(sender, recipients), recipients, self.message_path, len(MESSAGE))

    async def _failover(self) -> None:
        refused = closed_port()
        busy = self.scripted(b"421 4.3.2 busy, try later\r\n")
        port, reception, _ = self.server()
        spec = f"smtp:[127.0.0.1]:{refused}, smtp:[127.0.0.1]:{busy}, smtp:[127.0.0.1]:{port}"
        transport = SmtpTransport(spec, self.dialer, self.resolver, tls=TlsPolicy.NONE)
        (result,) = await transport.deliver(self.delivery())
        assert result.delivered, result
        assert result.relay == f"127.0.0.1[127.0.0.1]:{port}"
        _envelope, message = reception.accepted[0]
        assert message.data.endswith(MESSAGE)  # the dot-stuffed line came back unstuffed

    def test_failover_past_refused_and_busy_hosts(self) -> Deferred[None]:
        return ensureDeferred(self._failover())

    async def _all_fail(self) -> None:
        refused = closed_port()
        busy = self.scripted(b"421 4.3.2 busy, try later\r\n")
        spec = f"smtp:[127.0.0.1]:{busy}, smtp:[127.0.0.1]:{refused}"
        transport = SmtpTransport(spec, self.dialer, self.resolver, tls=TlsPolicy.NONE)
        (result,) = await transport.deliver(self.delivery())
        assert (result.code, result.enhanced, result.relay) == (451, "4.4.1", "none")
        assert result.text == f"connect to 127.0.0.1[127.0.0.1]:{refused}: Connection refused"

    def test_every_host_failing_is_transient(self) -> Deferred[None]:
        return ensureDeferred(self._all_fail())

    async def _greeting_5xx(self) -> None:
        port = self.scripted(b"554 5.7.1 no mail from you\r\n")
        transport = SmtpTransport(f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.NONE)
        (result,) = await transport.deliver(self.delivery())
        assert result.permanent
        assert "refused to talk to me: 554 5.7.1 no mail from you" in result.text

    def test_permanent_greeting_on_the_last_host(self) -> Deferred[None]:
        return ensureDeferred(self._greeting_5xx())

    async def _reuse(self) -> None:
        port, reception, factory = self.server()
        transport = SmtpTransport(f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.NONE)
        for _ in range(3):
            (result,) = await transport.deliver(self.delivery())
            assert result.delivered
            await deferLater(reactor, 0.05, lambda: None)  # the RSET round trip
        assert len(reception.accepted) == 3
        assert factory.connections == 1
        assert len(self.cache) == 1

    def test_connection_reused_after_rset(self) -> Deferred[None]:
        return ensureDeferred(self._reuse())

    async def _reuse_limit(self) -> None:
        self.cache.max_reuse = 2
        port, _reception, factory = self.server()
        transport = SmtpTransport(f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.NONE)
        for _ in range(3):
            (_result,) = await transport.deliver(self.delivery())
            await deferLater(reactor, 0.05, lambda: None)
        assert factory.connections == 2

    def test_max_reuse(self) -> Deferred[None]:
        return ensureDeferred(self._reuse_limit())

    async def _idle(self) -> None:
        self.cache.idle_timeout = 0.1
        port, _reception, factory = self.server()
        transport = SmtpTransport(f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.NONE)
        await transport.deliver(self.delivery())
        await deferLater(reactor, 0.3, lambda: None)
        assert len(self.cache) == 0
        await transport.deliver(self.delivery())
        assert factory.connections == 2

    def test_idle_sessions_expire(self) -> Deferred[None]:
        return ensureDeferred(self._idle())

    async def _server_closed_cached(self) -> None:
        port, _reception, factory = self.server()
        transport = SmtpTransport(f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.NONE)
        await transport.deliver(self.delivery())
        await deferLater(reactor, 0.05, lambda: None)
        # the server hangs up on the idle session without a word
        session = self.cache._idle[next(iter(self.cache._idle))][0][0]
        session.protocol.transport.write(b"QUIT\r\n")  # type: ignore[union-attr]
        await deferLater(reactor, 0.1, lambda: None)
        (result,) = await transport.deliver(self.delivery())
        assert result.delivered
        assert factory.connections == 2

    def test_cached_session_closed_by_the_server_is_replaced(self) -> Deferred[None]:
        return ensureDeferred(self._server_closed_cached())

    async def _per_recipient(self) -> None:
        port, reception, _ = self.server()
        reception.refuse_rcpt["bad@example.net"] = Reply(550, "5.1.1", "no such user")
        reception.refuse_rcpt["later@example.net"] = Reply(450, "4.2.1", "later")
        transport = SmtpTransport(f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.NONE)
        good, bad, later = await transport.deliver(
            self.delivery("good@example.net", "bad@example.net", "later@example.net")
        )
        assert good.delivered
        assert (bad.code, bad.enhanced) == (550, "5.1.1")
        assert (later.code, later.enhanced) == (450, "4.2.1")
        assert [r.address for r in reception.accepted[0][0].rcpt_to] == ["good@example.net"]

    def test_per_recipient_results(self) -> Deferred[None]:
        return ensureDeferred(self._per_recipient())

    # -- TLS -------------------------------------------------------------------------------

    async def _tls(
        self, policy: TlsPolicy, host: str = "mx.test", ca_file: str | None = None
    ) -> RecipientResult:
        port, reception, _ = self.server(tls=True)
        dialer = Dialer(
            reactor, self.settings, self.cache, ClientTls(self.ca_file if ca_file is None else ca_file)
        )
        self.addCleanup(lambda: ensureDeferred(dialer.close()))
        resolver = StaticResolver({host: {"A": ["127.0.0.1"]}})
        transport = SmtpTransport(f"smtp:[{host}]:{port}", dialer, resolver, tls=policy)
        (result,) = await transport.deliver(self.delivery())
        self.reception = reception
        return result

    async def _tls_may(self) -> None:
        result = await self._tls(TlsPolicy.MAY, ca_file="")
        assert result.delivered
        assert self.reception.sessions[-1].tls

    def test_tls_may(self) -> Deferred[None]:
        return ensureDeferred(self._tls_may())

    async def _tls_verify_ok(self) -> None:
        result = await self._tls(TlsPolicy.VERIFY)
        assert result.delivered, result
        assert self.reception.sessions[-1].tls

    def test_tls_verify_with_the_right_trust_root(self) -> Deferred[None]:
        return ensureDeferred(self._tls_verify_ok())

    async def _tls_verify_wrong_name(self) -> None:
        result = await self._tls(TlsPolicy.VERIFY, host="other.test")
        assert (result.code, result.enhanced) == (451, "4.7.5"), result
        assert result.text.startswith("TLS handshake with other.test[127.0.0.1]")
        assert not self.reception.accepted

    def test_tls_verify_fails_on_a_name_mismatch(self) -> Deferred[None]:
        return ensureDeferred(self._tls_verify_wrong_name())

    async def _tls_verify_untrusted(self) -> None:
        _other_key, other_cert = certificate_pem()
        other_ca = os.path.join(self.tmp, "other-ca.pem")
        with open(other_ca, "wb") as f:
            f.write(other_cert)
        result = await self._tls(TlsPolicy.VERIFY, ca_file=other_ca)
        assert (result.code, result.enhanced) == (451, "4.7.5"), result
        assert not self.reception.accepted

    def test_tls_verify_fails_on_an_untrusted_certificate(self) -> Deferred[None]:
        return ensureDeferred(self._tls_verify_untrusted())

    async def _tls_encrypt_not_offered(self) -> None:
        port, _reception, _ = self.server(tls=False)
        transport = SmtpTransport(
            f"smtp:[127.0.0.1]:{port}", self.dialer, self.resolver, tls=TlsPolicy.ENCRYPT
        )
        (result,) = await transport.deliver(self.delivery())
        assert (result.code, result.enhanced) == (451, "4.7.4")

    def test_tls_encrypt_when_not_offered(self) -> Deferred[None]:
        return ensureDeferred(self._tls_encrypt_not_offered())

    async def _auth(self) -> None:
        pool = ThreadPool(minthreads=1, maxthreads=2, name="auth-test")
        pool.start()
        self.addCleanup(pool.stop)
        users = FileCredentials.parse(
            [f"alice:{hash_password('alice-secret', cost=4)}"], reactor=reactor, threadpool=pool
        )
        port, reception, _ = self.server(tls=True, credentials=users)
        transport = SmtpTransport(
            f"smtp:[127.0.0.1]:{port}",
            self.dialer,
            self.resolver,
            tls=TlsPolicy.ENCRYPT,
            credentials=AuthCredentials("alice", "alice-secret"),
        )
        (result,) = await transport.deliver(self.delivery())
        assert result.delivered, result
        assert reception.sessions[-1].authenticated_user == "alice"
        bad = SmtpTransport(
            f"smtp:[127.0.0.1]:{port}",
            self.dialer,
            self.resolver,
            tls=TlsPolicy.ENCRYPT,
            credentials=AuthCredentials("alice", "wrong"),
        )
        (result,) = await bad.deliver(self.delivery())
        assert (result.code, result.enhanced) == (451, "4.7.0")
        assert "SASL authentication failed" in result.text

    def test_auth_over_tls_against_the_gateway_server(self) -> Deferred[None]:
        return ensureDeferred(self._auth())

    # -- MX ----------------------------------------------------------------------------------

    async def _mx(self) -> None:
        port, _reception, _ = self.server()
        resolver = StaticResolver(
            {
                "example.net": {"MX": [(20, "backup.example.net"), (10, "primary.example.net")]},
                "primary.example.net": {"A": ["127.0.0.2"]},
                "backup.example.net": {"A": ["127.0.0.1"]},
                "implicit.test": {"A": ["127.0.0.1"]},
                "null.test": {"MX": [(0, ".")]},
                "broken.test": DnsTemporaryError("SERVFAIL"),
            }
        )
        transport = MxTransport(self.dialer, resolver, tls=TlsPolicy.NONE, port=port)
        results = await transport.deliver(
            self.delivery(
                "a@example.net", "b@implicit.test", "c@null.test", "d@nowhere.test", "e@broken.test"
            )
        )
        a, b, c, d, e = results
        # the primary (127.0.0.2) refuses: nothing listens there; the backup takes it
        assert a.delivered and a.relay == f"backup.example.net[127.0.0.1]:{port}", a
        assert b.delivered and b.relay.startswith("implicit.test[127.0.0.1]")
        assert (c.code, c.enhanced) == (556, "5.1.10")
        assert (d.code, d.enhanced) == (550, "5.1.2")
        assert (e.code, e.enhanced) == (451, "4.4.3")
        assert ("primary.example.net", "A") in resolver.queries

    def test_mx_delivery(self) -> Deferred[None]:
        return ensureDeferred(self._mx())

    async def _mx_order(self) -> None:
        port, _reception, _ = self.server()
        resolver = StaticResolver(
            {
                "example.net": {"MX": [(10, "dead.example.net"), (20, "live.example.net")]},
                "dead.example.net": {"A": ["127.0.0.1"]},
                "live.example.net": {"A": ["127.0.0.1"]},
            }
        )
        # both names point at the same address; make the first one unusable by port: use two transports
        busy = self.scripted(b"421 busy\r\n")
        transport = MxTransport(self.dialer, resolver, tls=TlsPolicy.NONE, port=busy)
        (result,) = await transport.deliver(self.delivery("x@example.net"))
        assert result.code == 421 and result.relay.startswith("live.example.net"), (
            result
        )  # both tried, in order
        transport = MxTransport(self.dialer, resolver, tls=TlsPolicy.NONE, port=port, max_addresses=1)
        (result,) = await transport.deliver(self.delivery("x@example.net"))
        assert result.relay.startswith("dead.example.net")

    def test_mx_preference_order_and_address_limit(self) -> Deferred[None]:
        return ensureDeferred(self._mx_order())

    # -- LMTP --------------------------------------------------------------------------------

    async def _lmtp_unix(self) -> None:
        path = os.path.join(self.tmp, "lmtp.sock")
        factory = Factory.forProtocol(LmtpServer)
        port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        transport = LmtpTransport(f"lmtp:unix:{path}", self.dialer, self.resolver)
        ok, full = await transport.deliver(self.delivery("ok@example.net", "full@example.net"))
        assert ok.delivered and ok.relay == path
        assert (full.code, full.enhanced) == (452, "4.2.2")

    def test_lmtp_over_a_unix_socket(self) -> Deferred[None]:
        return ensureDeferred(self._lmtp_unix())


class LmtpServer(Protocol):
    """A minimal LMTP server: one reply per recipient; "full@" is over quota."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.recipients: list[bytes] = []
        self.data = False
        self.write(b"220 lmtp.test LMTP\r\n")

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.data:
                if line == b".":
                    self.data = False
                    for rcpt in self.recipients:
                        self.write(b"452 4.2.2 over quota\r\n" if b"full@" in rcpt else b"250 2.0.0 ok\r\n")
                    self.recipients = []
                continue
            verb = line[:4].upper()
            if verb == b"LHLO":
                self.write(b"250-lmtp.test\r\n250 PIPELINING\r\n")
            elif verb == b"RCPT":
                self.recipients.append(line)
                self.write(b"250 ok\r\n")
            elif verb == b"DATA":
                self.data = True
                self.write(b"354 go\r\n")
            elif verb == b"QUIT":
                self.write(b"221 bye\r\n")
                assert self.transport is not None
                self.transport.loseConnection()
            else:
                self.write(b"250 ok\r\n")
