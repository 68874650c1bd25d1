"""Regression tests named after the attacks on SMTP servers (and twisted.mail's flaws)."""

from __future__ import annotations

import attrs
import pytest

from gateway.smtp._data import DotReader, NewlineChecker
from tests.unit.test_smtp_server import SETTINGS, Dialogue


def test_starttls_command_injection() -> None:
    """CVE-2011-0411: commands pipelined after STARTTLS must not run inside TLS."""
    context = object()
    dialogue = Dialogue(tls_context=context)
    dialogue.ehlo()
    dialogue.send(b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.com>\r\n")
    assert dialogue.take() == ["220 2.0.0 Ready to start TLS"]
    assert dialogue.transport.tls_context is context
    assert dialogue.reception.calls == []
    # the first thing said over TLS is a fresh start: the injected MAIL never happened
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["503 5.5.1 Error: send HELO/EHLO first"]
    assert dialogue.reception.calls == []


def test_starttls_resets_the_session_to_before_ehlo() -> None:
    dialogue = Dialogue(tls_context=object())
    dialogue.ehlo("before.example")
    assert dialogue.ask("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    lines = dialogue.ehlo("after.example")
    assert "250-STARTTLS" not in lines and "250 STARTTLS" not in lines
    assert dialogue.ask("STARTTLS") == ["503 5.5.1 Error: TLS already active"]
    dialogue.ask("MAIL FROM:<a@example.org>")
    dialogue.ask("RCPT TO:<b@example.com>")
    dialogue.send_message()
    session = dialogue.reception.sessions[-1]
    assert session.tls and session.helo == "after.example"
    assert b" with ESMTPS id " in dialogue.reception.messages[0].data


def test_starttls_refused_inside_a_transaction_and_with_arguments() -> None:
    dialogue = Dialogue(tls_context=object())
    dialogue.transaction()
    assert dialogue.ask("STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]
    assert dialogue.ask("STARTTLS") == ["503 5.5.1 Error: STARTTLS inside a mail transaction"]


def test_tls_required_refuses_mail_before_starttls() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, tls_required=True), tls_context=object())
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["530 5.7.0 Must issue a STARTTLS command first"]
    dialogue.ask("STARTTLS")
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]


def test_unbounded_line() -> None:
    """twisted.mail buffers an over-long line without limit; we answer once and skip it."""
    dialogue = Dialogue()
    dialogue.ehlo()
    for _ in range(160):  # 10 MiB without a line end
        dialogue.send(b"A" * 65536)
        assert len(dialogue.protocol._buffer) <= SETTINGS.max_line_length
    assert dialogue.take() == ["500 5.5.6 Error: line too long"]
    dialogue.send(b"AAAA\r\nNOOP\r\n")
    assert dialogue.take() == ["250 2.0.0 Ok"]


def test_unbounded_line_limit_is_exact() -> None:
    dialogue = Dialogue()
    longest = b"NOOP " + b"x" * (SETTINGS.max_line_length - 7)  # 1000 octets with CRLF
    assert dialogue.ask(longest) == ["250 2.0.0 Ok"]
    assert dialogue.ask(longest + b"x") == ["500 5.5.6 Error: line too long"]
    assert dialogue.ask("NOOP") == ["250 2.0.0 Ok"]


def test_unbounded_line_repeated_disconnects() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_errors=3))
    dialogue.send((b"B" * 5000 + b"\r\n") * 3)
    assert dialogue.codes() == ["500 5.5.6 Error: line too long"] * 3 + [
        "421 4.7.0 mx.test Error: too many errors"
    ]
    assert dialogue.closed


def test_unbounded_line_in_an_auth_response() -> None:
    from tests.unit.test_smtp_auth import credentials

    dialogue = Dialogue(attrs.evolve(SETTINGS, auth_requires_tls=False), credentials=credentials())
    dialogue.ehlo()
    assert dialogue.ask("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    dialogue.send(b"Q" * 100_000)
    assert dialogue.take() == ["500 5.5.6 Error: line too long"]
    dialogue.send(b"\r\nNOOP\r\n")
    assert dialogue.take() == ["250 2.0.0 Ok"]  # back in command mode


SMUGGLING = {
    "bare_lf": b"\n.\n",
    "bare_cr": b"\r.\r",
    "lf_dot_crlf": b"\n.\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "cr_dot_crlf": b"\r.\r\n",
}


@pytest.mark.parametrize("ending", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_smtp_smuggling(ending: bytes) -> None:
    """A fake end of data must neither end the message nor let the smuggled mail through."""
    dialogue = Dialogue()
    dialogue.transaction()
    assert dialogue.ask("DATA")[0].startswith("354")
    dialogue.send(
        b"Subject: hi\r\n\r\nhello" + ending + b"MAIL FROM:<ceo@example.com>\r\n"
        b"RCPT TO:<victim@example.com>\r\nDATA\r\n\r\nsmuggled\r\n"
    )
    assert dialogue.take() == []  # still reading the first message
    assert [call[0] for call in dialogue.reception.calls] == ["mail", "rcpt", "new_message"]
    dialogue.send(b".\r\n")
    assert dialogue.take() == ["550 5.5.2 Error: bare CR or LF in message data"]
    assert dialogue.reception.messages[0].aborted
    assert dialogue.reception.accepted == []
    assert dialogue.ask("NOOP") == ["250 2.0.0 Ok"]


def test_smtp_smuggling_bare_lf_normalized_when_allowed() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, reject_bare_lf=False))
    dialogue.transaction()
    reply = dialogue.send_message(b"Subject: hi\r\n\r\nhello\n.\nMAIL FROM:<x@y>\rend\r\n")
    assert reply[0].startswith("250 ")
    stored = dialogue.stored()
    assert stored == b"Subject: hi\r\n\r\nhello\r\n.\r\nMAIL FROM:<x@y>\r\nend\r\n"
    assert stored.count(b"\n") == stored.count(b"\r\n") == stored.count(b"\r")
    assert [call[0] for call in dialogue.reception.calls].count("mail") == 1


def test_smtp_smuggling_terminator_split_across_reads() -> None:
    for cut in range(1, 5):
        dialogue = Dialogue()
        dialogue.transaction()
        dialogue.ask("DATA")
        stream = b"line\r\n.\r\nNOOP\r\n"
        dialogue.send(stream[: 4 + cut])
        dialogue.send(stream[4 + cut :])
        assert [line[:3] for line in dialogue.codes()] == ["250", "250"], cut
        assert dialogue.stored() == b"line\r\n"


def test_bare_lf_in_a_command_is_refused() -> None:
    """A command line with a bare LF (e.g. a HELO that would inject a header) is refused."""
    dialogue = Dialogue()
    assert dialogue.ask("EHLO foo\nX-Injected: 1") == ["500 5.5.2 Error: bare CR, LF or NUL in command"]
    assert dialogue.ask("NOOP\x00") == ["500 5.5.2 Error: bare CR, LF or NUL in command"]
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["503 5.5.1 Error: send HELO/EHLO first"]


def test_dot_reader_handles_every_split_of_a_stuffed_message() -> None:
    stream = b".a\r\n..\r\nb\r\n...c\r\n.\r\nafter"
    for cut in range(len(stream) + 1):
        reader = DotReader()
        first = stream[:cut]
        content, used, finished = reader.read(first, 0)
        out = content
        rest = first[used:] + stream[cut:]
        if not finished:
            content, used, finished = reader.read(rest, 0)
            out += content
            rest = rest[used:]
        assert finished and out == b"a\r\n.\r\nb\r\n..c\r\n" and rest == b"after", cut


def test_newline_checker_across_chunks() -> None:
    checker = NewlineChecker()
    assert not checker.feed(b"a\r")
    assert not checker.feed(b"\nb\r\n")
    assert not checker.finish()
    checker = NewlineChecker()
    checker.feed(b"a\r")
    assert checker.feed(b"b")
    checker = NewlineChecker()
    checker.feed(b"a\r")
    assert checker.finish()
