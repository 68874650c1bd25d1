"""The SMTP server over real loopback TCP with the reactor: STARTTLS, AUTH, injection.

The client is Python's smtplib (or a raw socket) in a thread; the certificate is a
throw-away self-signed one made here.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from gateway import certificates
from gateway.smtp.auth import FileCredentials, hash_password
from gateway.smtp.server import ServerSettings, SmtpServerFactory
from gateway.testing import RecordingReception


def self_signed_pem() -> bytes:
    certificate, key = certificates.self_signed_pem("mx.test")
    return key + certificate


def unverified_client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def read_reply(sock: socket.socket) -> str:
    """One whole (possibly multi-line) reply, read byte by byte so nothing extra is consumed."""
    lines: list[str] = []
    while True:
        line = b""
        while not line.endswith(b"\r\n"):
            byte = sock.recv(1)
            if not byte:
                raise ConnectionError(f"closed after {lines!r} {line!r}")
            line += byte
        lines.append(line.decode())
        if line[3:4] != b"-":
            return "".join(lines)


class LoopbackTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        pool = ThreadPool(minthreads=1, maxthreads=2, name="smtp-auth-test")
        pool.start()
        self.addCleanup(pool.stop)
        users = FileCredentials.parse(
            [
                f"alice:{hash_password('alice-secret', cost=4)}",
                f"bob:{hash_password('bob-secret', 'CRAM-MD5')}",
            ],
            reactor=reactor,
            threadpool=pool,
        )
        self.reception = RecordingReception()
        factory = SmtpServerFactory(
            ServerSettings(hostname="mx.test", auth_failure_delay=0.1),
            self.reception,
            clock=reactor,
            tls_context=PrivateCertificate.loadPEM(self_signed_pem()).options(),  # type: ignore[no-untyped-call]
            credentials=users,
            listener="tcp:0:interface=127.0.0.1",
        )
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port: int = self.listening.getHost().port  # type: ignore[attr-defined]

    def test_starttls_and_auth_with_smtplib(self) -> Deferred[Any]:
        def client() -> tuple[bool, bool, str]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as smtp:
                smtp.ehlo("client.test")
                auth_before = smtp.has_extn("auth")
                smtp.starttls(context=unverified_client_context())
                smtp.ehlo("client.test")
                auth_after = smtp.has_extn("auth")
                try:
                    smtp.login("alice", "wrong")
                except smtplib.SMTPAuthenticationError as error:
                    assert error.smtp_code == 535
                smtp.login("alice", "alice-secret")
                smtp.sendmail("alice@example.org", ["bob@example.net"], b"Subject: x\r\n\r\nhi\r\n")
                return auth_before, auth_after, smtp.esmtp_features["auth"]

        def check(result: tuple[bool, bool, str]) -> None:
            auth_before, auth_after, mechanisms = result
            assert not auth_before
            assert auth_after
            assert mechanisms.split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
            envelope, message = self.reception.accepted[0]
            assert [r.address for r in envelope.rcpt_to] == ["bob@example.net"]
            session = self.reception.sessions[-1]
            assert (session.authenticated_user, session.may_relay) == ("alice", True)
            assert session.tls
            assert b" with ESMTPSA id " in message.data
            assert b"(using TLSv1." in message.data
            assert message.data.endswith(b"Subject: x\r\n\r\nhi\r\n")

        return deferToThread(client).addCallback(check)

    def test_cram_md5_with_smtplib(self) -> Deferred[Any]:
        events: list[Any] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as smtp:
                smtp.starttls(context=unverified_client_context())
                smtp.ehlo("client.test")
                smtp.login("bob", "bob-secret")  # smtplib prefers CRAM-MD5

        def check(_: None) -> None:
            logins = [
                (e["user"], e["mechanism"]) for e in events if "authenticated" in e.get("log_format", "")
            ]
            assert logins == [("bob", "CRAM-MD5")]

        return deferToThread(client).addCallback(check)

    def test_starttls_command_injection_over_tcp(self) -> Deferred[Any]:
        """CVE-2011-0411 on the wire: NOOP sent with STARTTLS gets no answer inside TLS."""

        def client() -> tuple[bytes, str]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=20) as sock:
                read_reply(sock)
                sock.sendall(b"EHLO client.test\r\n")
                read_reply(sock)
                sock.sendall(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@example.net>\r\n")
                assert read_reply(sock).startswith("220 2.0.0")
                tls = unverified_client_context().wrap_socket(sock, server_hostname="mx.test")
                tls.settimeout(1.0)
                try:
                    unexpected = tls.recv(1024)
                except TimeoutError:
                    unexpected = b""
                tls.settimeout(20)
                tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
                after = read_reply(tls)
                tls.sendall(b"QUIT\r\n")
                read_reply(tls)
                return unexpected, after

        def check(result: tuple[bytes, str]) -> None:
            unexpected, after = result
            assert unexpected == b""
            assert after == "503 5.5.1 Error: send HELO/EHLO first\r\n"
            assert self.reception.calls == []

        return deferToThread(client).addCallback(check)
