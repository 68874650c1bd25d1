"""RFC 3464 bounces: who gets one, and what is in it."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.bounce import compose_bounce, needs_bounce, needs_delay_notice
from gateway.model import (
    Envelope,
    Notify,
    QueuedMessage,
    Recipient,
    RecipientResult,
    RecipientState,
    RecipientStatus,
    Ret,
)

ORIGINAL = b"Received: from x\r\nSubject: hello\r\nFrom: a@example.org\r\n\r\nThe body.\r\n"


def queued(envelope: Envelope, size: int = len(ORIGINAL)) -> QueuedMessage:
    states = tuple(RecipientState(r) for r in envelope.rcpt_to)
    return QueuedMessage("Q123", envelope, states, arrived=1_700_000_000.0, size=size)


def parse(report: bytes) -> Any:
    return email.message_from_bytes(report, policy=email.policy.default)


def bounce(
    tmp_path: Path, envelope: Envelope, failed: list[Any], size: int | None = None, **kwargs: bool
) -> Any:
    path = tmp_path / "original"
    path.write_bytes(ORIGINAL)
    message = queued(envelope, size if size is not None else len(ORIGINAL))
    report = compose_bounce(
        hostname="gw.example",
        message=message,
        failed=failed,
        original_path=str(path),
        now=1_700_000_100.0,
        **kwargs,
    )
    assert b"\n" not in report.replace(b"\r\n", b"")  # CRLF only, as the spool stores it
    return parse(report)


@pytest.mark.parametrize(
    ("mail_from", "notify", "expected"),
    [
        ("a@example.org", frozenset(), True),
        ("", frozenset(), False),  # never to the null sender
        ("a@example.org", frozenset({Notify.NEVER}), False),
        ("a@example.org", frozenset({Notify.SUCCESS}), False),
        ("a@example.org", frozenset({Notify.DELAY}), False),
        ("a@example.org", frozenset({Notify.FAILURE, Notify.DELAY}), True),
    ],
)
def test_needs_bounce(mail_from: str, notify: frozenset[Notify], expected: bool) -> None:
    recipient = Recipient("b@example.net", notify)
    assert needs_bounce(Envelope(mail_from, (recipient,)), recipient) is expected


def test_needs_delay_notice() -> None:
    asked = Recipient("b@example.net", frozenset({Notify.DELAY}))
    silent = Recipient("c@example.net")
    assert needs_delay_notice(Envelope("a@x", (asked,)), asked)
    assert not needs_delay_notice(Envelope("a@x", (silent,)), silent)
    assert needs_delay_notice(Envelope("a@x", (silent,)), silent, by_default=True)
    assert not needs_delay_notice(Envelope("", (asked,)), asked)


def test_report_structure_and_fields(tmp_path: Path) -> None:
    recipient = Recipient("b@example.net", orcpt="rfc822;B@Example.NET")
    envelope = Envelope("a@example.org", (recipient,), envid="ENV-1")
    result = RecipientResult(
        recipient,
        550,
        "5.1.1",
        "host mx.example.net[192.0.2.1]:25 said: 550 5.1.1 <b@example.net>: no such user"
        " (in reply to RCPT TO command)",
        "mx.example.net[192.0.2.1]:25",
    )
    report = bounce(tmp_path, envelope, [(recipient, result)])
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@gw.example"
    assert report["To"].addresses[0].addr_spec == "a@example.org"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, returned = report.iter_parts()
    assert "could not" in human.get_content()
    assert "<b@example.net>: 550 5.1.1" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.example"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    assert per_message["Arrival-Date"]
    assert per_recipient["Final-Recipient"] == "rfc822; b@example.net"
    assert per_recipient["Original-Recipient"] == "rfc822; B@Example.NET"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.net"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <b@example.net>: no such user"
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "hello"


def test_from_recipient_states_as_the_queue_manager_passes_them(tmp_path: Path) -> None:
    recipient = Recipient("b@example.net")
    state = RecipientState(
        recipient,
        RecipientStatus.FAILED,
        attempts=16,
        last_reply="451 4.4.1 connect to mx.example.net[192.0.2.1]:25: Connection refused"
        " (gave up after 16 attempts)",
        relay="none",
    )
    report = bounce(tmp_path, Envelope("a@example.org", (recipient,)), [state])
    _human, status, _returned = report.iter_parts()
    per_recipient = status.get_payload()[1]
    assert per_recipient["Status"] == "4.4.1"  # expired: Postfix reports the last transient status
    assert per_recipient["Diagnostic-Code"] is None
    assert "Connection refused" in per_recipient["X-Mailgate-Reason"]


def test_ret_hdrs_returns_headers_only(tmp_path: Path) -> None:
    recipient = Recipient("b@example.net")
    report = bounce(
        tmp_path, Envelope("a@example.org", (recipient,), ret=Ret.HDRS), [(recipient, "550 5.0.0 no")]
    )
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"The body." not in report.as_bytes()
    assert b"Subject: hello" in report.as_bytes()


def test_big_message_returns_headers_only_by_default(tmp_path: Path) -> None:
    recipient = Recipient("b@example.net")
    report = bounce(
        tmp_path, Envelope("a@example.org", (recipient,)), [(recipient, "550 no")], size=10_000_000
    )
    assert list(report.iter_parts())[2].get_content_type() == "text/rfc822-headers"


def test_delayed_notice(tmp_path: Path) -> None:
    recipient = Recipient("b@example.net", frozenset({Notify.DELAY}))
    report = bounce(
        tmp_path,
        Envelope("a@example.org", (recipient,)),
        [(recipient, "451 4.4.1 connect failed")],
        delayed=True,
    )
    assert report["Subject"] == "Delayed Mail (still being retried)"
    per_recipient = list(report.iter_parts())[1].get_payload()[1]
    assert (per_recipient["Action"], per_recipient["Status"]) == ("delayed", "4.4.1")


def test_several_recipients(tmp_path: Path) -> None:
    one, two = Recipient("b@example.net"), Recipient("c@example.net")
    report = bounce(
        tmp_path, Envelope("a@example.org", (one, two)), [(one, "550 5.1.1 x"), (two, "552 5.2.2 y")]
    )
    blocks = list(report.iter_parts())[1].get_payload()
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "5.2.2"]
