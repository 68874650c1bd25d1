"""The SMTP transport against Postfix's smtp-sink on loopback: a real, strict peer."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from gateway.delivery.connections import ConnectionCache, Dialer
from gateway.delivery.resolver import StaticResolver
from gateway.delivery.smtp import SmtpTransport
from gateway.model import Delivery, Envelope, Recipient
from gateway.smtp.client import ClientSettings, TlsPolicy

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SmtpSinkTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if SMTP_SINK is None:
            if os.environ.get("CI"):
                self.fail("smtp-sink is not installed: apt-get install postfix")
            raise pytest.skip.Exception("smtp-sink is not installed (apt-get install postfix)")
        self.tmp = tempfile.mkdtemp(prefix="mailgate-sink-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.port = free_port()
        # -d: dump each message into a file; -u: stay who we are when run as root
        command = [SMTP_SINK, "-d", os.path.join(self.tmp, "%M."), f"127.0.0.1:{self.port}", "100"]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
            os.chmod(self.tmp, 0o777)
        self.sink = subprocess.Popen(command, stderr=subprocess.PIPE)
        self.addCleanup(self.sink.wait, 10)
        self.addCleanup(self.sink.terminate)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.sink.poll() is not None or time.monotonic() > deadline:
                    self.fail(
                        f"smtp-sink did not start: {self.sink.stderr.read() if self.sink.stderr else ''!r}"
                    )
                time.sleep(0.05)
        self.cache = ConnectionCache(reactor)
        self.dialer = Dialer(reactor, ClientSettings("gw.test"), self.cache)
        self.addCleanup(lambda: ensureDeferred(self.dialer.close()))

    async def _send(self) -> None:
        body = b"Subject: sink\r\n\r\n.leading dot\r\nbare\nlf\r\n" + b"x" * 200_000 + b"\r\n.\r\nafter\r\n"
        path = os.path.join(self.tmp, "message")
        with open(path, "wb") as f:
            f.write(body)
        transport = SmtpTransport(
            f"smtp:[127.0.0.1]:{self.port}", self.dialer, StaticResolver({}), tls=TlsPolicy.NONE
        )
        recipients = (Recipient("b@example.net"), Recipient("c@example.net"))
        for _ in range(3):
            results = await transport.deliver(
                Delivery("Q1", Envelope("a@example.org", recipients), recipients, path, len(body))
            )
            assert all(r.delivered for r in results), results
        dumps: list[str] = []
        deadline = time.monotonic() + 5
        while len(dumps) < 3 and time.monotonic() < deadline:
            from twisted.internet.task import deferLater

            await deferLater(reactor, 0.1, lambda: None)
            dumps = [p for p in glob.glob(os.path.join(self.tmp, "*.*")) if not p.endswith("message")]
        assert len(dumps) == 3, dumps
        with open(dumps[0], "rb") as f:
            dumped = f.read()
        # smtp-sink writes the unstuffed data, LF line ends, after its own trace headers
        assert b"X-Rcpt-Args: <c@example.net>\n" in dumped
        assert b"\nSubject: sink\n\n.leading dot\nbare\nlf\n" in dumped
        assert dumped.endswith(b"x\n.\nafter\n\n") or dumped.endswith(b"x\n.\nafter\n")

    def test_three_messages_through_smtp_sink(self) -> Deferred[None]:
        return ensureDeferred(self._send())
