"""Relay control and the hand-over to the spool."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import TestCase

from gateway.config import RelayConfig
from gateway.model import Envelope, Recipient, Role, Session
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.smtp.reply import Reply

RELAY = RelayConfig(domains=("example.com", "*.corp.example"), networks=(ipaddress.ip_network("10.0.0.0/8"),))
ENVELOPE = Envelope("someone@outside.test", ())


def result(d: object) -> object:
    found: list[object] = []
    d.addBoth(found.append)  # type: ignore[attr-defined]
    return found[0]


class ReceptionTests(TestCase):
    def setUp(self) -> None:
        self.spool = MemorySpool()
        self.reception = Reception(self.spool, RELAY)

    def rcpt(self, session: Session, address: str) -> object:
        return result(self.reception.open_session(session).rcpt(session, ENVELOPE, Recipient(address)))

    def test_internet_may_send_to_our_domains_only(self) -> None:
        outsider = Session("203.0.113.9", role=Role.INBOUND)
        self.assertIsNone(self.rcpt(outsider, "bob@example.com"))
        self.assertIsNone(self.rcpt(outsider, "bob@eu.corp.example"))
        self.assertIsNone(self.rcpt(outsider, "postmaster"))
        refused = self.rcpt(outsider, "victim@elsewhere.test")
        self.assertEqual(refused, Reply(554, "5.7.1", "<victim@elsewhere.test>: Relay access denied"))
        # a look-alike domain is not ours
        self.assertIsInstance(self.rcpt(outsider, "bob@notexample.com"), Reply)
        self.assertIsInstance(self.rcpt(outsider, "bob@corp.example"), Reply)

    def test_relay_clients_and_authenticated_users_may_relay_anywhere(self) -> None:
        self.assertIsNone(self.rcpt(Session("10.1.2.3", may_relay=True), "x@elsewhere.test"))

    def test_submission_port_refuses_strangers_at_mail(self) -> None:
        stranger = Session("203.0.113.9", role=Role.SUBMISSION)
        self.assertEqual(result(self.reception.open_session(stranger).mail(stranger, ENVELOPE)).code, 530)  # type: ignore[attr-defined]
        friend = Session("10.0.0.5", role=Role.SUBMISSION, may_relay=True)
        self.assertIsNone(result(self.reception.open_session(friend).mail(friend, ENVELOPE)))

    def test_accept_answers_250_only_after_commit(self) -> None:
        checks = self.reception.open_session(Session("10.0.0.5"))
        message = checks.new_message(Session("10.0.0.5"))
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        reply = result(
            checks.accept(Session("10.0.0.5"), Envelope("a@b.test", (Recipient("c@example.com"),)), message)
        )
        self.assertEqual(reply.code, 250)  # type: ignore[attr-defined]
        self.assertIn(message.queue_id, reply.text)  # type: ignore[attr-defined]
        self.assertIn(message.queue_id, self.spool.messages)

    def test_spool_failure_is_451_never_5xx(self) -> None:
        self.spool.failure = OSError(28, "No space left on device")
        checks = self.reception.open_session(Session("10.0.0.5"))
        message = checks.new_message(Session("10.0.0.5"))
        message.write(b"x\r\n")
        reply = result(checks.accept(Session("10.0.0.5"), ENVELOPE, message))
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))  # type: ignore[attr-defined]
        self.assertEqual(self.spool.messages, {})
