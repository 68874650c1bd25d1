"""The POP2 client (RFC 937) on a StringTransport and a Clock: login, listing, retrieval, deletion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.fetch import (
    AuthenticationFailed,
    FetchError,
    IMailboxSession,
    MailboxAccount,
    ProtocolViolation,
    RemoteMessage,
    TlsRefused,
)
from gateway.fetch._pop2_wire import Pop2Wire
from gateway.fetch.pop2 import Pop2Session, connect_pop2, start_session
from gateway.fetch.pop3 import header_digest
from tests.unit.test_fetch_accounts import account as account_text
from tests.unit.test_fetch_accounts import error, parse
from tests.unit.test_fetch_pop3 import TlsStringTransport, failure_of, result_of

PASSWORD = "s3cret-Pa55"
FIRST = b"From: a@example.net\r\nSubject: one\r\n\r\nbody one\r\n"
SECOND = b"From: b@example.net\r\nSubject: two\r\n\r\nbody two\r\n"


def account(**changes: Any) -> MailboxAccount:
    values: dict[str, Any] = {
        "host": "pop2.test",
        "port": 109,
        "username": "alice",
        "password": PASSWORD,
        "tls": "none",
        "timeout": 30.0,
    }
    values.update(changes)
    return MailboxAccount(**values)


class Dialogue:
    def __init__(self, **changes: Any) -> None:
        self.account = account(**changes)
        self.clock = Clock()
        self.wire = Pop2Wire(
            self.clock, "pop2.test:109", self.account.timeout, implicit_tls=self.account.tls == "implicit"
        )
        self.transport = TlsStringTransport()
        self.wire.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.login = start_session(self.account, self.wire)

    def server(self, text: bytes) -> None:
        self.wire.dataReceived(text)

    def sent(self) -> bytes:
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        self.transport.clear()  # type: ignore[no-untyped-call]
        return value

    def logged_in(self, count: int = 2) -> Pop2Session:
        self.server(b"+ POP2 pop2.test server ready\r\n")
        assert self.sent() == f"HELO alice {PASSWORD}\r\n".encode()
        self.server(b"#%d messages\r\n" % count)
        return result_of(self.login)

    def listed(self, session: Pop2Session) -> list[RemoteMessage]:
        listing = session.list_messages()
        for number, text in ((1, FIRST), (2, SECOND)):
            assert self.sent() == b"READ %d\r\n" % number
            self.server(b"=%d\r\n" % len(text))
            assert self.sent() == b"RETR\r\n"
            self.server(text)
            assert self.sent() == b"NACK\r\n"  # listing keeps every message
            self.server(b"=%d\r\n" % len(text))
        return result_of(listing)


def test_login_lists_messages_with_ids_from_their_headers() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    assert IMailboxSession.providedBy(session)
    messages = dialogue.listed(session)
    assert [(m.number, m.size) for m in messages] == [(1, len(FIRST)), (2, len(SECOND))]
    assert messages[0].uid == "hdr-" + header_digest(FIRST)
    assert messages[0].uid != messages[1].uid


def test_identical_headers_get_distinct_ids() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    listing = session.list_messages()
    for number in (1, 2):
        assert dialogue.sent() == b"READ %d\r\n" % number
        dialogue.server(b"=%d\r\n" % len(FIRST))
        assert dialogue.sent() == b"RETR\r\n"
        dialogue.server(FIRST)
        assert dialogue.sent() == b"NACK\r\n"
        dialogue.server(b"=%d\r\n" % len(FIRST))
    first, second = result_of(listing)
    assert second.uid == first.uid + "-2"


def test_wrong_password_is_authentication_failed_and_never_shown() -> None:
    dialogue = Dialogue()
    dialogue.server(b"+ POP2 ready\r\n")
    dialogue.sent()
    dialogue.server(b"- bad login\r\n")
    error = failure_of(dialogue.login)
    assert isinstance(error, AuthenticationFailed)
    assert PASSWORD not in str(error)
    assert dialogue.transport.aborted


def test_retrieve_counts_octets_and_deletes_only_what_was_marked_after_it() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    first, second = dialogue.listed(session)
    pieces: list[bytes] = []
    retrieved = session.retrieve(first, pieces.append)
    assert dialogue.sent() == b"READ 1\r\n"
    dialogue.server(b"=%d\r\n" % len(FIRST))
    assert dialogue.sent() == b"RETR\r\n"
    dialogue.server(FIRST[:10])
    dialogue.server(FIRST[10:])
    assert result_of(retrieved) == len(FIRST)
    assert b"".join(pieces) == FIRST
    assert dialogue.sent() == b""  # not acknowledged until the session moves on
    result_of(session.delete([first]))  # queued with a 250: the poller marks it
    retrieved = session.retrieve(second, pieces.append)
    assert dialogue.sent() == b"ACKD\r\n"
    dialogue.server(b"=%d\r\n" % len(SECOND))
    assert dialogue.sent() == b"READ 2\r\n"
    dialogue.server(b"=%d\r\n" % len(SECOND))
    assert dialogue.sent() == b"RETR\r\n"
    dialogue.server(SECOND)
    result_of(retrieved)
    closing = session.close()  # the second one was not marked: kept
    assert dialogue.sent() == b"ACKS\r\n"
    dialogue.server(b"=0\r\n")
    assert dialogue.sent() == b"QUIT\r\n"
    dialogue.server(b"+ bye\r\n")
    result_of(closing)


def test_messages_marked_later_are_read_again_and_deleted_at_close() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    _first, second = dialogue.listed(session)
    result_of(session.delete([second]))  # e.g. kept mail past delete_after, not fetched now
    closing = session.close()
    assert dialogue.sent() == b"READ 2\r\n"
    dialogue.server(b"=%d\r\n" % len(SECOND))
    assert dialogue.sent() == b"RETR\r\n"
    dialogue.server(SECOND)
    assert dialogue.sent() == b"ACKD\r\n"
    dialogue.server(b"=0\r\n")
    assert dialogue.sent() == b"QUIT\r\n"
    dialogue.server(b"+\r\n")
    result_of(closing)


def test_abort_after_retrieve_acknowledges_nothing() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    first, _second = dialogue.listed(session)
    retrieved = session.retrieve(first, lambda piece: None)
    dialogue.sent()
    dialogue.server(b"=%d\r\n" % len(FIRST))
    dialogue.sent()
    dialogue.server(FIRST)
    result_of(retrieved)
    result_of(session.delete([first]))
    session.abort()
    assert dialogue.transport.aborted
    assert dialogue.sent() == b""  # no ACKD went out: the message stays on the server


def test_bare_lf_made_crlf_even_across_pieces() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(count=1)
    raw = b"Subject: x\r\n\nline\nend\r"
    listing = session.list_messages()
    dialogue.sent()
    dialogue.server(b"=%d\r\n" % (len(raw) + 1))
    dialogue.sent()
    dialogue.server(raw)
    pieces: list[bytes] = []
    assert not listing.called
    dialogue.server(b"\n")
    dialogue.sent()
    dialogue.server(b"=1\r\n")
    [message] = result_of(listing)
    retrieved = session.retrieve(message, pieces.append)
    dialogue.sent()
    dialogue.server(b"=%d\r\n" % (len(raw) + 1))
    dialogue.sent()
    dialogue.server(raw)
    dialogue.server(b"\n")
    assert b"".join(pieces) == b"Subject: x\r\n\r\nline\r\nend\r\n"
    assert result_of(retrieved) == len(b"Subject: x\r\n\r\nline\r\nend\r\n")


def test_a_line_that_is_no_pop2_answer_is_a_protocol_violation() -> None:
    dialogue = Dialogue()
    dialogue.server(b"+OK this is POP3\r\n")
    dialogue.sent()
    dialogue.server(b"+OK logged in\r\n")
    error = failure_of(dialogue.login)
    assert isinstance(error, ProtocolViolation | AuthenticationFailed)
    dialogue = Dialogue()
    session = dialogue.logged_in(count=1)
    listing = session.list_messages()
    dialogue.sent()
    dialogue.server(b"OK 12\r\n")
    assert isinstance(failure_of(listing), ProtocolViolation)


def test_silence_times_out() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(count=1)
    listing = session.list_messages()
    dialogue.clock.advance(31)
    error = failure_of(listing)
    assert isinstance(error, FetchError)
    assert "30 s while READ 1" in str(error)


def test_quit_refused_says_deletions_not_done() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(count=0)
    result_of(session.list_messages())
    closing = session.close()
    assert dialogue.sent() == b"QUIT\r\n"
    dialogue.server(b"- cannot save\r\n")
    assert "deletions not done" in str(failure_of(closing))


def test_plain_text_needs_tls_none_and_starttls_is_refused() -> None:
    dialogue = Dialogue(tls="implicit")
    dialogue.server(b"+ ready\r\n")
    assert dialogue.sent() == b""  # no HELO (no password) before the handshake
    dialogue.wire.handshakeCompleted()
    assert dialogue.sent() == f"HELO alice {PASSWORD}\r\n".encode()
    error = failure_of(connect_pop2(account(tls="starttls"), Clock()))
    assert isinstance(error, TlsRefused)


@pytest.mark.parametrize("password", ["two words", "line\nbreak"])
def test_a_password_helo_cannot_carry_is_refused_before_sending(password: str) -> None:
    dialogue = Dialogue(password=password)
    dialogue.server(b"+ ready\r\n")
    assert isinstance(failure_of(dialogue.login), AuthenticationFailed)
    assert dialogue.sent() == b""


def test_fold_opens_another_mailbox() -> None:
    dialogue = Dialogue(folder="archive")
    dialogue.server(b"+ ready\r\n")
    dialogue.sent()
    dialogue.server(b"#3\r\n")
    assert dialogue.sent() == b"FOLD archive\r\n"
    dialogue.server(b"#1\r\n")
    assert result_of(dialogue.login).count == 1


def test_plain_transport_without_tls_is_fine_for_tls_none() -> None:
    transport = StringTransport()  # type: ignore[no-untyped-call]
    wire = Pop2Wire(Clock(), "p", 5)
    wire.makeConnection(transport)  # type: ignore[no-untyped-call]
    login = start_session(account(), wire)
    wire.dataReceived(b"+\r\n#0\r\n")
    assert result_of(login).count == 0


def test_pop2_accounts_in_the_config(tmp_path: Path) -> None:
    text = account_text(tmp_path, 'tls = "none"\ninsecure = true').replace('"pop3"', '"pop2"')
    [old] = parse(text, tmp_path).accounts
    assert (old.protocol, old.port, old.tls) == ("pop2", 109, "none")
    starttls = account_text(tmp_path, 'tls = "starttls"').replace('"pop3"', '"pop2"')
    assert "POP2 has no STARTTLS" in error(starttls, tmp_path)
    plain = account_text(tmp_path, 'tls = "none"').replace('"pop3"', '"pop2"')
    assert "insecure = true" in error(plain, tmp_path)
    apop = account_text(tmp_path, 'auth = "apop"').replace('"pop3"', '"pop2"')
    assert "auth" in error(apop, tmp_path)
