"""The Maildir transport: tmp -> new, unique names, trace headers, per-user dirs, errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from gateway.delivery.maildir import MaildirTransport, maildir_for
from gateway.model import Delivery, Envelope, Recipient, RecipientResult

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def test_template_is_filled_in_safely() -> None:
    assert maildir_for("/m/{domain}/{local}/", "Bob@Example.NET") == "/m/example.net/bob/"
    escaped = maildir_for("/m/{domain}/{local}/", "../../etc@x")
    assert ".." not in escaped.split("/")
    assert escaped.startswith("/m/x/")


class MaildirTests(TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(1, 2, "maildir-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.root = Path(tempfile.mkdtemp(prefix="mailgate-maildir-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.message = self.root / "message"
        self.message.write_bytes(MESSAGE)

    def deliver(self, template: str, *addresses: str) -> Deferred[list[RecipientResult]]:
        transport = MaildirTransport(template, reactor=reactor, threadpool=self.pool)
        recipients = tuple(Recipient(a) for a in addresses)
        return transport.deliver(
            Delivery("Q1", Envelope("a@example.org", recipients), recipients, str(self.message), len(MESSAGE))
        )

    def test_delivers_into_new_with_trace_headers(self) -> Deferred[None]:
        def check(results: list[RecipientResult]) -> None:
            assert [r.delivered for r in results] == [True, True, True]
            bob = self.root / "example.net" / "bob"
            files = sorted(os.listdir(bob / "new"))
            assert len(files) == 2 and files[0] != files[1]  # two copies, unique names
            assert os.listdir(bob / "tmp") == []
            assert (bob / "cur").is_dir()
            content = (bob / "new" / files[0]).read_bytes()
            assert content == b"Return-Path: <a@example.org>\r\nDelivered-To: bob@example.net\r\n" + MESSAGE
            assert results[0].relay == f"maildir:{bob}/"
            assert os.listdir(self.root / "example.net" / "carol" / "new")

        template = str(self.root) + "/{domain}/{local}/"
        return self.deliver(template, "bob@example.net", "bob@example.net", "carol@example.net").addCallback(
            check
        )

    def test_unwritable_directory_is_transient(self) -> Deferred[None]:
        blocker = self.root / "blocked"
        blocker.write_bytes(b"not a directory")

        def check(results: list[RecipientResult]) -> None:
            (result,) = results
            assert (result.code, result.enhanced) == (451, "4.3.0")
            assert "cannot write to" in result.text

        return self.deliver(str(blocker) + "/{local}/", "bob@example.net").addCallback(check)
