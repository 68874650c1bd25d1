"""The clamav filter: what clamd finds is rejected, held or dropped, with notices and counts by name.

clamd is played by recorded answers (tests/unit/test_clamd.py) over an in-memory
endpoint; the filter runs in the real reception and chain.
"""

from __future__ import annotations

import base64
import email
import email.policy
import io
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import ConfigError
from gateway.content import Attachment, MessageContent, ParsedMessage
from gateway.filters import FilterServices, Request
from gateway.filters.clamav import ClamAV
from gateway.filters.testing import RecordingOutbox
from gateway.interfaces import IFilter
from gateway.model import Action, Direction, Envelope, Recipient, Stage
from gateway.scanners import ScannerTooLarge
from gateway.scanners.clamd import ClamdClient
from gateway.scanners.testing import MemoryEndpoint
from gateway.smtp.reply import Reply
from gateway.state.memory import MemoryStore
from tests.unit.reception_driver import config
from tests.unit.test_clamd import CLEAN, EICAR, FOUND, TOO_LARGE, unstream
from tests.unit.test_filter_spamassassin import CLIENT, deliver, settled

VIRUS = "Eicar-Test-Signature.UNOFFICIAL"
PLAIN = b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: invoice\r\n\r\nSee attached.\r\n"


def with_attachments(*files: tuple[str, bytes]) -> bytes:
    parts = [b"--XX\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"]
    for name, payload in files:
        parts.append(
            b"--XX\r\nContent-Type: application/octet-stream; name=%s\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=%s\r\n\r\n%s"
            % (name.encode(), name.encode(), base64.encodebytes(payload).replace(b"\n", b"\r\n"))
        )
    return (
        b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n" + b"".join(parts) + b"--XX--\r\n"
    )


class Scanner:
    """A clamav filter over a scripted clamd, with a recording outbox and a memory store."""

    def __init__(self, script: list[Any], **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.endpoint = MemoryEndpoint(script=script)
        self.outbox = RecordingOutbox()
        self.store = MemoryStore(self.clock)
        client = ClamdClient(self.endpoint, self.clock, address="unix:/run/clamav/clamd.ctl")
        self.filter = ClamAV(
            client,
            store=lambda: self.store,
            outbox=lambda: self.outbox,
            clock=self.clock,
            hostname="gw.test",
            **options,
        )

    def count(self, name: str) -> Any:
        return settled(self.store.count("virus", name))

    def scanned(self) -> list[bytes]:
        """What each INSTREAM carried."""
        return [unstream(sent) for sent in self.endpoint.requests()]


def request(content: MessageContent, sender: str = "a@partner.test") -> Request:
    return Request(
        Stage.DATA,
        Direction.INBOUND,
        CLIENT,
        Envelope(sender, (Recipient("bob@example.com"), Recipient("carol@example.com"))),
        message=content,
    )


def test_provides_filter_at_data() -> None:
    scanner = Scanner([])
    assert verifyObject(IFilter, scanner.filter)
    assert scanner.filter.stages == frozenset({Stage.DATA})


def test_a_clean_message_is_scanned_whole_and_passes() -> None:
    scanner = Scanner([CLEAN])
    delivered = deliver(scanner.filter, PLAIN)
    assert delivered.reply.code == 250
    [content] = scanner.scanned()
    assert content.endswith(PLAIN)  # the raw message as received
    assert scanner.outbox.sent == []


def test_a_virus_is_rejected_with_its_name_counted_and_the_postmaster_told() -> None:
    scanner = Scanner([FOUND])
    delivered = deliver(scanner.filter, with_attachments(("eicar.com", EICAR)))
    assert delivered.reply == Reply(554, "5.7.1", f"Virus found: {VIRUS}")
    assert delivered.spool.messages == {}
    assert scanner.count(VIRUS) == 1
    [(mail_from, rcpt_to, notice)] = scanner.outbox.sent
    assert (mail_from, rcpt_to) == ("", ("postmaster@example.com",))  # from the null sender
    parsed = email.message_from_bytes(notice, policy=email.policy.default)
    assert parsed["Subject"] == f"Virus found: {VIRUS}"
    assert parsed["From"] == "Mail gateway <MAILER-DAEMON@gw.test>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Date"] is not None and parsed["Message-ID"] is not None
    body = parsed.get_content()
    assert "refused it (554 5.7.1)" in body
    assert f"Virus:      {VIRUS}" in body
    assert "Sender:     <a@partner.test>" in body
    assert "Recipients: <bob@example.com>" in body
    assert "Client:     [192.0.2.10] (HELO mail.partner.test)" in body
    assert "Subject:    invoice" in body
    second = Scanner([FOUND])
    second.store = scanner.store
    deliver(second.filter, PLAIN)
    assert scanner.count(VIRUS) == 2  # statistics by name


def test_quarantine_holds_the_message() -> None:
    scanner = Scanner([FOUND], action="quarantine")
    delivered = deliver(scanner.filter, PLAIN)
    assert delivered.reply.code == 250
    assert delivered.states() == ["hold"]
    assert "held it in the virus quarantine" in scanner.outbox.sent[0][2].decode()
    verdict = settled(
        Scanner([FOUND], action="quarantine").filter.check(request(MessageContent.from_bytes(PLAIN)))
    )
    assert verdict.action is Action.QUARANTINE
    assert verdict.reason == f"virus: {VIRUS} in the message"


def test_discard_drops_the_message() -> None:
    scanner = Scanner([FOUND], action="discard")
    delivered = deliver(scanner.filter, PLAIN)
    assert delivered.reply.code == 250
    assert delivered.spool.messages == {}


def test_notices_to_sender_and_recipients_but_never_the_null_sender() -> None:
    scanner = Scanner([FOUND, FOUND], notify=("postmaster", "sender", "recipients"))
    deliver(scanner.filter, PLAIN, recipients=("bob@example.com", "carol@example.com"))
    assert [(mail_from, rcpt_to) for mail_from, rcpt_to, _ in scanner.outbox.sent] == [
        ("", ("postmaster@example.com",)),
        ("", ("a@partner.test",)),
        ("", ("bob@example.com", "carol@example.com")),
    ]
    scanner.outbox.sent.clear()
    deliver(scanner.filter, PLAIN, sender="")  # a bounce carrying a virus
    assert [rcpt_to for _, rcpt_to, _ in scanner.outbox.sent] == [
        ("postmaster@example.com",),
        ("bob@example.com",),
    ]


def test_no_notices_when_none_wanted_and_a_failing_outbox_does_not_change_the_verdict() -> None:
    quiet = Scanner([FOUND], notify=())
    assert deliver(quiet.filter, PLAIN).reply.code == 554
    assert quiet.outbox.sent == []
    broken = Scanner([FOUND])
    broken.outbox.failure = RuntimeError("queue full")
    assert deliver(broken.filter, PLAIN).reply.code == 554


def test_scope_attachments_scans_each_attachment_decoded_and_not_the_text() -> None:
    scanner = Scanner([CLEAN, FOUND], scope="attachments")
    delivered = deliver(scanner.filter, with_attachments(("readme.txt", b"hello"), ("eicar.com", EICAR)))
    assert delivered.reply.code == 554
    assert scanner.scanned() == [b"hello", EICAR]
    assert (
        'Found in:   attachment "eicar.com" (application/octet-stream)' in scanner.outbox.sent[0][2].decode()
    )


def test_scope_attachments_passes_a_message_without_attachments_unscanned_by_clamd() -> None:
    scanner = Scanner([], scope="attachments")
    assert deliver(scanner.filter, PLAIN).reply.code == 250
    assert scanner.endpoint.attempts == []


def test_too_large_fails_by_default_so_the_message_is_deferred() -> None:
    scanner = Scanner([], max_size=100)
    delivered = deliver(scanner.filter, PLAIN + b"x" * 200)
    assert delivered.reply.code == 451
    assert scanner.endpoint.attempts == []  # not sent at all


def test_clamd_stream_max_length_exceeded_fails_by_default() -> None:
    scanner = Scanner([TOO_LARGE])
    assert deliver(scanner.filter, PLAIN).reply.code == 451


def test_too_large_continue_passes_with_a_header_saying_so() -> None:
    scanner = Scanner([TOO_LARGE], too_large="continue")
    delivered = deliver(scanner.filter, PLAIN)
    assert delivered.reply.code == 250
    assert b"X-Mailgate-ClamAV: not scanned (clamd did not scan it: INSTREAM size limit exceeded." in (
        delivered.queued()
    )
    big = Scanner([], too_large="continue", scope="attachments", max_size=3)
    stored = deliver(big.filter, with_attachments(("a.bin", b"1234"))).queued()
    assert (
        b'X-Mailgate-ClamAV: not scanned (attachment "a.bin" of 4 bytes is larger than max_size 3)' in stored
    )


def test_a_truncated_parse_is_unscanned_not_clean() -> None:
    parsed = ParsedMessage(
        headers=(("Subject", "x"),),
        text="",
        attachments=(Attachment("a.txt", "text/plain", b"hi"),),
        truncated=True,
    )
    content = MessageContent(10, lambda: io.BytesIO(b"Subject: x\r\n\r\n"), lambda raw: parsed)
    scanner = Scanner([CLEAN], scope="attachments")
    answer = scanner.filter.check(request(content))
    assert isinstance(answer, Deferred)
    with pytest.raises(ScannerTooLarge, match="parse stopped at a limit"):
        settled(answer)
    assert scanner.endpoint.attempts == []


@pytest.mark.parametrize(
    "script",
    [
        [ConnectionRefusedError(111, "Connection refused")],  # clamd down
        [b"stream: Can't allocate memory ERROR\0"],
        [b"stream: O"],  # killed mid-answer
        [b"UNKNOWN COMMAND\0"],
    ],
)
def test_clamd_broken_defers_the_message_never_passes_it(script: list[Any]) -> None:
    scanner = Scanner(script)
    delivered = deliver(scanner.filter, PLAIN)
    assert delivered.reply.code == 451
    assert delivered.spool.messages == {}
    assert scanner.outbox.sent == []


def test_clamd_silent_the_runner_cancels_and_the_connection_is_dropped() -> None:
    scanner = Scanner([None])
    answer = scanner.filter.check(request(MessageContent.from_bytes(PLAIN)))
    assert isinstance(answer, Deferred)
    answer.cancel()  # what the chain runner does when the filter's timeout passes
    failures: list[Any] = []
    answer.addErrback(failures.append)
    assert failures
    assert scanner.endpoint.last.dropped
    assert scanner.filter.client.connections.busy == 0


# -- configuration ----------------------------------------------------------------------------


def build(options: str) -> ClamAV:
    cfg = config(f'[filters]\ninbound = ["clamav"]\n[filters.clamav]\n{options}')
    section = cfg.filters.section(cfg.source, "clamav")
    built = ClamAV.from_config(section, FilterServices(cfg, Clock(), outbox=RecordingOutbox()))
    section.done()
    return built


def test_defaults() -> None:
    clamav = build("")
    connections = clamav.client.connections
    assert connections.address == "unix:/var/run/clamav/clamd.ctl"
    assert (connections.max_connections, connections.connect_timeout, connections.timeout) == (10, 5.0, 20.0)
    assert (clamav.scope, clamav.action, clamav.notify) == ("message", "reject", ("postmaster",))
    assert (clamav.max_size, clamav.too_large) == (25 * 1024 * 1024, "fail")
    assert clamav.hostname == "gw.test"


def test_options_are_read() -> None:
    clamav = build(
        'server = "tcp:127.0.0.1:3310"\nmax_connections = 3\nconnect_timeout = 1\nscan_timeout = "2m"\n'
        'scope = "attachments"\naction = "quarantine"\nnotify = ["postmaster", "recipients"]\n'
        'max_size = "10M"\ntoo_large = "continue"\n'
    )
    connections = clamav.client.connections
    assert (connections.address, connections.max_connections) == ("tcp:127.0.0.1:3310", 3)
    assert (connections.connect_timeout, connections.timeout) == (1.0, 120.0)
    assert (clamav.scope, clamav.action, clamav.notify) == (
        "attachments",
        "quarantine",
        ("postmaster", "recipients"),
    )
    assert (clamav.max_size, clamav.too_large) == (10 * 1024 * 1024, "continue")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ('server = "tcp:"', "filters.clamav.server"),
        ("max_connections = 0", "filters.clamav.max_connections"),
        ("connect_timeout = 0", "filters.clamav.connect_timeout"),
        ('scope = "body"', "filters.clamav.scope"),
        ('action = "notify"', "filters.clamav.action"),
        ('notify = ["admin"]', "filters.clamav.notify"),
        ("max_size = 0", "filters.clamav.max_size"),
        ('too_large = "pass"', "filters.clamav.too_large"),
        ("scan = 1", "filters.clamav.scan"),
    ],
)
def test_bad_options_name_the_key(options: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(options)
