"""The IMAP client on a StringTransport and a Clock: each exchange and the server quirks.

`Dialogue` plays the server: `server(b"...")` feeds its bytes, `sent()` takes what
the client wrote since the last look. The server's lines are Dovecot 2.3's. TLS is
simulated: `startTLS` is recorded and `handshake()` says the handshake completed.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.fetch import (
    AuthenticationFailed,
    FetchError,
    IMailboxSession,
    MailboxAccount,
    ProtocolViolation,
    RemoteMessage,
    TlsRefused,
)
from gateway.fetch.imap import IDLE_RENEWAL, ImapProtocol, ImapSession, start_session

T = TypeVar("T")
PASSWORD = 's3cret "Pa55\\'
GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] ready.\r\n"
)
GREETING_STARTTLS = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED]"
    b" ready.\r\n"
)
AFTER_LOGIN = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES UIDPLUS MOVE LITERAL+"
SELECTED = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n"
    b"* 3 EXISTS\r\n"
    b"* 0 RECENT\r\n"
    b"* OK [UIDVALIDITY 1700000001] UIDs valid\r\n"
    b"* OK [UIDNEXT 8] Predicted next UID\r\n"
    b"%s OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"
)
MESSAGE = b"From: a@example.net\r\nSubject: hello\r\n\r\n" + b"a line of the body\r\n" * 100


@implementer(ITLSTransport)
class TlsStringTransport(StringTransport):  # type: ignore[misc]
    """A StringTransport that records startTLS instead of doing it."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tls_options: object = None
        self.aborted = False

    def startTLS(self, options: object) -> None:
        self.tls_options = options

    def abortConnection(self) -> None:
        self.aborted = True


def account(**changes: Any) -> MailboxAccount:
    values: dict[str, Any] = {
        "host": "imap.test",
        "port": 993,
        "username": "alice",
        "password": PASSWORD,
        "tls": "implicit",
        "timeout": 30.0,
    }
    values.update(changes)
    return MailboxAccount(**values)


def result_of(deferred: Deferred[T]) -> T:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    value: T = results[0]
    return value


def failure_of(deferred: Deferred[Any]) -> BaseException:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"it succeeded with {results[0]!r}"
    error = results[0].value
    assert isinstance(error, BaseException)
    return error


class Dialogue:
    """One client session against a scripted server."""

    def __init__(self, greeting: bytes | None = GREETING, *, max_message_size: int = 1 << 20, **changes: Any):
        self.account = account(**changes)
        self.clock = Clock()
        self.transport = TlsStringTransport()
        self.protocol = ImapProtocol(
            self.clock,
            "imap.test:993",
            self.account.timeout,
            max_message_size=max_message_size,
            implicit_tls=self.account.tls == "implicit",
            tls_options=lambda: "TLS-OPTIONS",
        )
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        if self.account.tls == "implicit":
            self.protocol.handshakeCompleted()
        self.opening = start_session(self.protocol, self.account, self.clock)
        if greeting is not None:
            self.server(greeting)

    def server(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        self.transport.clear()  # type: ignore[no-untyped-call]
        return value

    def expect(self, line: bytes, answer: bytes = b"") -> None:
        assert self.sent() == line
        if answer:
            self.server(answer)

    def handshake(self) -> None:
        self.protocol.handshakeCompleted()


def plain_token(user: str = "alice", password: str = PASSWORD) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def logged_in(
    capabilities: bytes = AFTER_LOGIN, selected: bytes = SELECTED, **changes: Any
) -> tuple[Dialogue, ImapSession]:
    dialogue = Dialogue(**changes)
    dialogue.expect(
        b"M1 AUTHENTICATE PLAIN " + plain_token() + b"\r\n",
        b"M1 OK [CAPABILITY " + capabilities + b"] Logged in\r\n",
    )
    dialogue.expect(b'M2 SELECT "INBOX"\r\n', selected.replace(b"%s", b"M2"))
    return dialogue, result_of(dialogue.opening)


# -- logging in ---------------------------------------------------------------------------------------


def test_imaps_login_with_authenticate_plain_and_sasl_ir_then_select() -> None:
    _dialogue, session = logged_in()
    assert verifyObject(IMailboxSession, session)
    assert (session.uidvalidity, session.uidnext, session.exists, session.read_only) == (
        1700000001,
        8,
        3,
        False,
    )
    assert {"UIDPLUS", "MOVE", "IDLE"} <= session.capabilities
    assert "AUTH=PLAIN" not in session.capabilities, "the capabilities are those given after the login"


def test_authenticate_plain_without_sasl_ir_waits_for_the_continuation() -> None:
    dialogue = Dialogue(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready.\r\n")
    dialogue.expect(b"M1 AUTHENTICATE PLAIN\r\n", b"+ \r\n")
    dialogue.expect(plain_token() + b"\r\n", b"M1 OK Logged in\r\n")
    dialogue.expect(b"M2 CAPABILITY\r\n", b"* CAPABILITY IMAP4rev1 UIDPLUS\r\nM2 OK done\r\n")
    dialogue.expect(b'M3 SELECT "INBOX"\r\n', SELECTED.replace(b"%s", b"M3"))
    assert result_of(dialogue.opening).capabilities == {"IMAP4REV1", "UIDPLUS"}


def test_a_second_challenge_in_plain_is_cancelled() -> None:
    dialogue = Dialogue(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready.\r\n")
    dialogue.expect(b"M1 AUTHENTICATE PLAIN\r\n", b"+ \r\n")
    dialogue.expect(plain_token() + b"\r\n", b"+ bW9yZT8=\r\n")
    dialogue.expect(b"*\r\n", b"M1 BAD Authentication cancelled\r\n")
    assert isinstance(failure_of(dialogue.opening), AuthenticationFailed)


def test_login_quotes_the_password_when_plain_is_not_offered() -> None:
    dialogue = Dialogue(b"* OK [CAPABILITY IMAP4rev1] ready.\r\n")
    dialogue.expect(b'M1 LOGIN "alice" "s3cret \\"Pa55\\\\"\r\n', b"M1 OK Logged in\r\n")
    assert dialogue.sent() == b"M2 CAPABILITY\r\n"


def test_login_sends_an_8bit_password_as_a_literal_after_the_continuation() -> None:
    dialogue = Dialogue(b"* OK [CAPABILITY IMAP4rev1] ready.\r\n", password="pässwörd", auth="login")
    raw = "pässwörd".encode()
    dialogue.expect(b'M1 LOGIN "alice" {%d}\r\n' % len(raw))
    dialogue.server(b"+ OK\r\n")
    dialogue.expect(raw + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert dialogue.sent() == b'M2 SELECT "INBOX"\r\n'


def test_login_with_literal_plus_sends_the_literal_at_once() -> None:
    dialogue = Dialogue(
        b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready.\r\n", password="line\nbreak", auth="login"
    )
    dialogue.expect(b'M1 LOGIN "alice" {10+}\r\nline\nbreak\r\n')


@pytest.mark.parametrize(
    "answer", [b"M1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", b"M1 BAD nonsense\r\n"]
)
def test_refused_credentials_are_authentication_failed_without_the_password(answer: bytes) -> None:
    dialogue = Dialogue()
    dialogue.sent()
    dialogue.server(answer)
    error = failure_of(dialogue.opening)
    assert isinstance(error, AuthenticationFailed)
    assert "alice" in str(error) and PASSWORD not in str(error) and "Pa55" not in str(error)
    assert dialogue.transport.aborted


def test_unavailable_is_a_temporary_failure_not_a_wrong_password() -> None:
    dialogue = Dialogue()
    dialogue.sent()
    dialogue.server(b"M1 NO [UNAVAILABLE] Temporary authentication failure.\r\n")
    error = failure_of(dialogue.opening)
    assert isinstance(error, FetchError) and not isinstance(error, AuthenticationFailed)


def test_logindisabled_without_plain_sends_no_password() -> None:
    dialogue = Dialogue(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] ready.\r\n", tls="none")
    assert isinstance(failure_of(dialogue.opening), AuthenticationFailed)
    assert dialogue.sent() == b""


def test_preauth_skips_the_login() -> None:
    dialogue = Dialogue(b"* PREAUTH [CAPABILITY IMAP4rev1 IDLE] logged in as alice\r\n")
    dialogue.expect(b'M1 SELECT "INBOX"\r\n', SELECTED.replace(b"%s", b"M1"))
    assert result_of(dialogue.opening).uidvalidity == 1700000001


def test_bye_as_greeting_is_an_error_with_its_text() -> None:
    dialogue = Dialogue(b"* BYE Too many connections\r\n")
    error = failure_of(dialogue.opening)
    assert isinstance(error, FetchError) and "Too many connections" in str(error)


def test_a_greeting_that_is_not_imap_is_a_protocol_violation() -> None:
    dialogue = Dialogue(b"+OK POP3 server ready\r\n")
    assert isinstance(failure_of(dialogue.opening), ProtocolViolation)
    assert dialogue.transport.aborted


def test_no_greeting_times_out() -> None:
    dialogue = Dialogue(None, timeout=20.0)
    dialogue.clock.advance(19)
    assert not dialogue.opening.called
    dialogue.clock.advance(2)
    error = failure_of(dialogue.opening)
    assert "did not answer within 20 s while waiting for the greeting" in str(error)


def test_an_answer_that_does_not_come_times_out_but_a_slow_one_does_not() -> None:
    dialogue = Dialogue(timeout=20.0)
    dialogue.expect(
        b"M1 AUTHENTICATE PLAIN " + plain_token() + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
    )
    dialogue.sent()
    for line in SELECTED.replace(b"%s", b"M2").splitlines(keepends=True)[:-1]:
        dialogue.clock.advance(15)  # each line within the timeout: the answer is progressing
        dialogue.server(line)
    dialogue.clock.advance(21)
    error = failure_of(dialogue.opening)
    assert "while opening the folder 'INBOX'" in str(error)


# -- TLS ------------------------------------------------------------------------------------------------


def test_starttls_then_capabilities_again_then_the_password() -> None:
    dialogue = Dialogue(GREETING_STARTTLS, tls="starttls")
    dialogue.expect(b"M1 STARTTLS\r\n", b"M1 OK Begin TLS negotiation now.\r\n")
    assert dialogue.transport.tls_options == "TLS-OPTIONS"
    assert dialogue.sent() == b"M2 CAPABILITY\r\n"
    dialogue.handshake()
    dialogue.server(
        b"* CAPABILITY IMAP4rev1 SASL-IR IDLE AUTH=PLAIN\r\nM2 OK Pre-login capabilities listed.\r\n"
    )
    dialogue.expect(b"M3 AUTHENTICATE PLAIN " + plain_token() + b"\r\n")


def test_plaintext_injected_after_the_starttls_ok_is_refused() -> None:
    """CVE-2011-0411's pattern: a line after the OK, in the same read, would pass as from inside TLS."""
    dialogue = Dialogue(GREETING_STARTTLS, tls="starttls")
    dialogue.sent()
    dialogue.server(b"M1 OK Begin TLS negotiation now.\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
    assert isinstance(failure_of(dialogue.opening), ProtocolViolation)
    assert dialogue.transport.tls_options is None, "TLS never started"
    assert dialogue.transport.aborted and dialogue.sent() == b""


def test_starttls_required_but_not_offered_sends_nothing_more() -> None:
    dialogue = Dialogue(GREETING, tls="starttls")
    assert isinstance(failure_of(dialogue.opening), TlsRefused)
    assert dialogue.sent() == b""


def test_starttls_refused_by_the_server() -> None:
    dialogue = Dialogue(GREETING_STARTTLS, tls="starttls")
    dialogue.expect(b"M1 STARTTLS\r\n", b"M1 NO TLS not available\r\n")
    error = failure_of(dialogue.opening)
    assert isinstance(error, TlsRefused) and "TLS not available" in str(error)


def test_preauth_in_plain_text_cannot_be_secured() -> None:
    dialogue = Dialogue(b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", tls="starttls")
    assert isinstance(failure_of(dialogue.opening), TlsRefused)


def test_no_password_before_the_handshake_completed() -> None:
    dialogue = Dialogue(GREETING_STARTTLS, tls="starttls")
    dialogue.expect(b"M1 STARTTLS\r\n", b"M1 OK Begin TLS negotiation now.\r\n")
    dialogue.expect(b"M2 CAPABILITY\r\n", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nM2 OK done\r\n")
    assert isinstance(failure_of(dialogue.opening), TlsRefused)
    assert dialogue.sent() == b""


def test_plain_text_only_when_the_account_says_none() -> None:
    dialogue = Dialogue(GREETING_STARTTLS.replace(b" LOGINDISABLED", b""), tls="none")
    dialogue.expect(b'M1 LOGIN "alice" "s3cret \\"Pa55\\\\"\r\n')  # no STARTTLS: the account said none
    assert dialogue.transport.tls_options is None


def test_a_handshake_that_fails_is_tls_refused() -> None:
    dialogue = Dialogue(GREETING_STARTTLS, tls="starttls")
    dialogue.expect(b"M1 STARTTLS\r\n", b"M1 OK Begin TLS negotiation now.\r\n")
    dialogue.protocol.connectionLost(Failure(Exception("certificate verify failed")))  # type: ignore[no-untyped-call]
    error = failure_of(dialogue.opening)
    assert isinstance(error, TlsRefused) and "certificate verify failed" in str(error)


# -- the folder -------------------------------------------------------------------------------------


def test_a_non_ascii_folder_is_selected_by_its_modified_utf7_name() -> None:
    dialogue = Dialogue(folder="Entwürfe/Größe & Co")
    dialogue.expect(
        b"M1 AUTHENTICATE PLAIN " + plain_token() + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
    )
    dialogue.expect(b'M2 SELECT "Entw&APw-rfe/Gr&APYA3w-e &- Co"\r\n', SELECTED.replace(b"%s", b"M2"))
    assert result_of(dialogue.opening).folder == "Entwürfe/Größe & Co"


def test_a_folder_that_cannot_be_opened_names_it() -> None:
    dialogue = Dialogue(folder="Archive")
    dialogue.expect(
        b"M1 AUTHENTICATE PLAIN " + plain_token() + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
    )
    dialogue.expect(b'M2 SELECT "Archive"\r\n', b"M2 NO Mailbox doesn't exist: Archive\r\n")
    error = failure_of(dialogue.opening)
    assert isinstance(error, FetchError) and "'Archive'" in str(error) and "doesn't exist" in str(error)


def test_a_select_without_uidvalidity_is_refused() -> None:
    dialogue = Dialogue()
    dialogue.expect(
        b"M1 AUTHENTICATE PLAIN " + plain_token() + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
    )
    dialogue.expect(b'M2 SELECT "INBOX"\r\n', b"* 3 EXISTS\r\nM2 OK [READ-WRITE] done\r\n")
    assert isinstance(failure_of(dialogue.opening), ProtocolViolation)


# -- listing -----------------------------------------------------------------------------------------


def test_list_gives_uidvalidity_and_uid_with_sizes_despite_updates_in_the_middle() -> None:
    dialogue, session = logged_in()
    listing = session.list_messages()
    dialogue.expect(b"M3 UID FETCH 1:* (UID RFC822.SIZE)\r\n")
    dialogue.server(
        b"* 1 FETCH (UID 3 RFC822.SIZE 1200)\r\n"
        b"* 2 FETCH (FLAGS (\\Seen))\r\n"  # another client read message 2 meanwhile
        b"* 2 EXPUNGE\r\n"  # and deleted it
        b"* 4 EXISTS\r\n"
        b"* 2 FETCH (UID 6 RFC822.SIZE 99)\r\n"
        b"* 3 FETCH (RFC822.SIZE 5000 UID 7)\r\n"
        b"M3 OK Fetch completed.\r\n"
    )
    assert result_of(listing) == [
        RemoteMessage("1700000001:3", 1200, 1),
        RemoteMessage("1700000001:6", 99, 2),
        RemoteMessage("1700000001:7", 5000, 3),
    ]
    assert session.exists == 4


def test_an_empty_folder_is_listed_without_asking() -> None:
    dialogue, session = logged_in(selected=SELECTED.replace(b"* 3 EXISTS", b"* 0 EXISTS"))
    assert result_of(session.list_messages()) == []
    assert dialogue.sent() == b""


# -- retrieving ------------------------------------------------------------------------------------


def test_retrieve_streams_the_body_as_it_arrives_and_marks_nothing_seen() -> None:
    dialogue, session = logged_in()
    pieces: list[bytes] = []
    fetching = session.retrieve(RemoteMessage("1700000001:7", len(MESSAGE), 3), pieces.append)
    dialogue.expect(b"M3 UID FETCH 7 (BODY.PEEK[])\r\n")
    answer = b"* 3 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\nM3 OK Fetch completed.\r\n" % (len(MESSAGE), MESSAGE)
    for start in range(0, len(answer), 500):
        dialogue.server(answer[start : start + 500])
        if start and start + 500 < len(answer) - 100:
            assert not fetching.called
    assert result_of(fetching) == len(MESSAGE)
    assert b"".join(pieces) == MESSAGE and len(pieces) > 3


QUIRKY_ANSWER = (
    b"* 4 EXISTS\r\n* 3 FETCH (FLAGS (\\Recent) UID 7 BODY[] {%d}\r\n%s FLAGS (\\Recent))\r\n"
    b"* 1 EXPUNGE\r\n* OK [HIGHESTMODSEQ 9] x\r\nM3 OK Fetch completed.\r\n" % (len(MESSAGE), MESSAGE)
)


@settings(max_examples=60)
@given(st.lists(st.integers(min_value=1, max_value=len(QUIRKY_ANSWER) - 1), max_size=40))
def test_any_split_of_the_answer_gives_the_same_message(cuts: list[int]) -> None:
    dialogue, session = logged_in()
    pieces: list[bytes] = []
    fetching = session.retrieve(RemoteMessage("1700000001:7", len(MESSAGE), 3), pieces.append)
    dialogue.expect(b"M3 UID FETCH 7 (BODY.PEEK[])\r\n")
    points = sorted({0, *cuts, len(QUIRKY_ANSWER)})
    for start, end in itertools.pairwise(points):
        dialogue.server(QUIRKY_ANSWER[start:end])
    assert result_of(fetching) == len(MESSAGE)
    assert b"".join(pieces) == MESSAGE
    assert session.exists == 3


def test_a_body_with_the_uid_after_it_and_flags_around_it() -> None:
    dialogue, session = logged_in()
    pieces: list[bytes] = []
    fetching = session.retrieve(RemoteMessage("1700000001:7", 5, 3), pieces.append)
    dialogue.sent()
    dialogue.server(
        b"* 3 FETCH (BODY[] {5}\r\nhello UID 7)\r\n* 3 FETCH (FLAGS (\\Recent))\r\nM3 OK done\r\n"
    )
    assert result_of(fetching) == 5 and pieces == [b"hello"]


def test_a_body_sent_as_a_quoted_string_is_written_too() -> None:
    dialogue, session = logged_in()
    pieces: list[bytes] = []
    fetching = session.retrieve(RemoteMessage("1700000001:7", 5, 3), pieces.append)
    dialogue.sent()
    dialogue.server(b'* 3 FETCH (UID 7 BODY[] "hello")\r\nM3 OK done\r\n')
    assert result_of(fetching) == 5 and pieces == [b"hello"]


def test_a_message_expunged_meanwhile_is_an_error_not_an_empty_message() -> None:
    dialogue, session = logged_in()
    fetching = session.retrieve(RemoteMessage("1700000001:7", 5, 3), lambda piece: None)
    dialogue.sent()
    dialogue.server(b"M3 OK Fetch completed.\r\n")
    error = failure_of(fetching)
    assert isinstance(error, FetchError) and "no longer" in str(error)


def test_another_messages_body_is_a_protocol_violation() -> None:
    dialogue, session = logged_in()
    fetching = session.retrieve(RemoteMessage("1700000001:7", 5, 3), lambda piece: None)
    dialogue.sent()
    dialogue.server(b"* 2 FETCH (UID 6 BODY[] {5}\r\nhello)\r\nM3 OK done\r\n")
    assert isinstance(failure_of(fetching), ProtocolViolation)


def test_a_message_of_an_old_uidvalidity_is_not_fetched() -> None:
    dialogue, session = logged_in()
    error = failure_of(session.retrieve(RemoteMessage("1600000000:7", 5, 3), lambda piece: None))
    assert isinstance(error, FetchError) and "UIDVALIDITY 1700000001" in str(error)
    assert dialogue.sent() == b""


def test_a_writer_that_fails_fails_the_retrieve_and_the_session_goes_on() -> None:
    dialogue, session = logged_in()

    def full(_piece: bytes) -> None:
        raise OSError(28, "No space left on device")

    fetching = session.retrieve(RemoteMessage("1700000001:7", 5, 3), full)
    dialogue.sent()
    dialogue.server(b"* 3 FETCH (UID 7 BODY[] {5}\r\nhel")
    dialogue.server(b"lo)\r\nM3 OK done\r\n")
    assert isinstance(failure_of(fetching), OSError)
    listing = session.list_messages()
    dialogue.expect(
        b"M4 UID FETCH 1:* (UID RFC822.SIZE)\r\n", b"* 1 FETCH (UID 7 RFC822.SIZE 5)\r\nM4 OK done\r\n"
    )
    assert result_of(listing) == [RemoteMessage("1700000001:7", 5, 1)]


def test_a_body_larger_than_the_limit_is_refused_when_announced() -> None:
    dialogue, session = logged_in(max_message_size=1000)
    pieces: list[bytes] = []
    fetching = session.retrieve(RemoteMessage("1700000001:7", 5, 3), pieces.append)
    dialogue.sent()
    dialogue.server(b"* 3 FETCH (UID 7 BODY[] {1001}\r\n" + b"x" * 500)
    assert isinstance(failure_of(fetching), ProtocolViolation)
    assert pieces == [] and dialogue.transport.aborted


def test_an_over_long_line_ends_the_session() -> None:
    dialogue, session = logged_in()
    listing = session.list_messages()
    dialogue.sent()
    dialogue.server(b"* 1 FETCH (UID 3 RFC822.SIZE 1200 X-JUNK " + b"x" * 70000)
    error = failure_of(listing)
    assert isinstance(error, ProtocolViolation) and "longer than" in str(error)
    assert dialogue.transport.aborted
    assert isinstance(failure_of(session.list_messages()), ProtocolViolation), "the session is over"


# -- deleting, moving, closing ---------------------------------------------------------------------


def messages(*uids: int) -> list[RemoteMessage]:
    return [RemoteMessage(f"1700000001:{uid}", 100, index + 1) for index, uid in enumerate(uids)]


def test_delete_then_close_expunges_exactly_those_uids_with_uidplus() -> None:
    dialogue, session = logged_in()
    result_of(session.delete(messages(3, 4, 5)))
    result_of(session.delete(messages(9)))
    assert dialogue.sent() == b"", "nothing flagged before close"
    closing = session.close()
    dialogue.expect(b"M3 UID STORE 3:5,9 +FLAGS.SILENT (\\Deleted)\r\n", b"M3 OK Store completed.\r\n")
    dialogue.expect(
        b"M4 UID EXPUNGE 3:5,9\r\n",
        b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nM4 OK Expunge completed.\r\n",
    )
    dialogue.expect(b"M5 LOGOUT\r\n", b"* BYE Logging out\r\nM5 OK Logout completed.\r\n")
    assert result_of(closing) is None
    assert dialogue.transport.disconnecting


def test_without_uidplus_close_falls_back_to_expunge() -> None:
    dialogue, session = logged_in(capabilities=b"IMAP4rev1 IDLE")
    result_of(session.delete(messages(3)))
    closing = session.close()
    dialogue.expect(b"M3 UID STORE 3 +FLAGS.SILENT (\\Deleted)\r\n", b"M3 OK done\r\n")
    dialogue.expect(b"M4 EXPUNGE\r\n", b"* 1 EXPUNGE\r\nM4 OK done\r\n")
    dialogue.expect(b"M5 LOGOUT\r\n", b"* BYE bye\r\nM5 OK done\r\n")
    assert result_of(closing) is None


def test_close_without_deletions_only_logs_out_and_a_server_hanging_up_is_fine() -> None:
    dialogue, session = logged_in()
    closing = session.close()
    dialogue.expect(b"M3 LOGOUT\r\n", b"* BYE Logging out\r\n")
    dialogue.protocol.connectionLost(Failure(Exception("closed")))  # type: ignore[no-untyped-call]
    assert result_of(closing) is None


def test_a_refused_store_fails_the_close() -> None:
    dialogue, session = logged_in()
    result_of(session.delete(messages(3)))
    closing = session.close()
    dialogue.expect(b"M3 UID STORE 3 +FLAGS.SILENT (\\Deleted)\r\n", b"M3 NO Mailbox is read-only\r\n")
    error = failure_of(closing)
    assert isinstance(error, FetchError) and "read-only" in str(error)


def test_abort_flags_nothing_and_drops_the_connection() -> None:
    dialogue, session = logged_in()
    result_of(session.delete(messages(3)))
    session.abort()
    assert dialogue.sent() == b"" and dialogue.transport.aborted


def test_many_scattered_deletions_are_cut_into_short_commands() -> None:
    dialogue, session = logged_in()
    result_of(session.delete(messages(*range(1, 6000, 2))))
    session.close()
    command = dialogue.sent()
    assert command.startswith(b"M3 UID STORE 1,3,5,") and len(command) < 4100
    dialogue.server(b"M3 OK done\r\n")
    assert dialogue.sent().startswith(b"M4 UID EXPUNGE 1,3,5,")


def test_move_uses_uid_move() -> None:
    dialogue, session = logged_in()
    moving = session.move(messages(3, 4), "Archiv/2026 Größe")
    dialogue.expect(b'M3 UID MOVE 3:4 "Archiv/2026 Gr&APYA3w-e"\r\n', b"M3 OK Move completed.\r\n")
    assert result_of(moving) is None


def test_move_creates_a_missing_folder() -> None:
    dialogue, session = logged_in()
    moving = session.move(messages(3), "Done")
    dialogue.expect(b'M3 UID MOVE 3 "Done"\r\n', b"M3 NO [TRYCREATE] Mailbox doesn't exist: Done\r\n")
    dialogue.expect(b'M4 CREATE "Done"\r\n', b"M4 OK Create completed.\r\n")
    dialogue.expect(b'M5 UID MOVE 3 "Done"\r\n', b"M5 OK Move completed.\r\n")
    assert result_of(moving) is None


def test_move_without_move_copies_and_deletes_at_close() -> None:
    dialogue, session = logged_in(capabilities=b"IMAP4rev1 UIDPLUS")
    moving = session.move(messages(3), "Done")
    dialogue.expect(b'M3 UID COPY 3 "Done"\r\n', b"M3 OK Copy completed.\r\n")
    assert result_of(moving) is None
    session.close()
    dialogue.expect(b"M4 UID STORE 3 +FLAGS.SILENT (\\Deleted)\r\n", b"M4 OK done\r\n")
    assert dialogue.sent() == b"M5 UID EXPUNGE 3\r\n"


# -- IDLE ---------------------------------------------------------------------------------------------


def test_idle_reports_new_mail_and_done_ends_it() -> None:
    dialogue, session = logged_in()
    changes: list[str] = []
    idling = session.idle(lambda: changes.append("new"))
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n")
    dialogue.clock.advance(20 * 60)  # no answer is due while idling: no timeout
    assert not idling.called and changes == []
    dialogue.server(b"* 4 EXISTS\r\n* 1 RECENT\r\n")
    assert changes == ["new", "new"]
    stopping = session.done()
    dialogue.expect(b"DONE\r\n", b"M3 OK Idle completed (0.001 + 20.000 secs).\r\n")
    assert result_of(stopping) is None and result_of(idling) is None
    assert session.exists == 4


def test_idle_is_renewed_before_29_minutes_pass() -> None:
    dialogue, session = logged_in()
    changes: list[str] = []
    idling = session.idle(lambda: changes.append("new"))
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n")
    dialogue.clock.advance(IDLE_RENEWAL)
    dialogue.expect(b"DONE\r\n", b"* 4 EXISTS\r\nM3 OK Idle completed.\r\n")
    assert changes == ["new"], "what came during the renewal is reported too"
    dialogue.expect(b"M4 IDLE\r\n", b"+ idling\r\n")
    assert not idling.called
    dialogue.clock.advance(IDLE_RENEWAL)
    dialogue.expect(b"DONE\r\n", b"M4 OK Idle completed.\r\n")
    dialogue.expect(b"M5 IDLE\r\n")


def test_an_unanswered_done_times_out() -> None:
    dialogue, session = logged_in(timeout=30.0)
    idling = session.idle(lambda: None)
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n")
    stopping = session.done()
    dialogue.expect(b"DONE\r\n")
    dialogue.clock.advance(31)
    assert isinstance(failure_of(idling), FetchError)
    assert result_of(stopping) is None
    assert dialogue.transport.aborted


def test_mail_that_came_since_the_last_list_is_reported_when_idle_starts() -> None:
    dialogue, session = logged_in()
    listing = session.list_messages()
    dialogue.expect(b"M3 UID FETCH 1:* (UID RFC822.SIZE)\r\n", b"* 4 EXISTS\r\nM3 OK done\r\n")
    result_of(listing)
    changes: list[str] = []
    session.idle(lambda: changes.append("new"))
    dialogue.expect(b"M4 IDLE\r\n", b"+ idling\r\n")
    assert changes == ["new"]


def test_a_command_during_idle_ends_it_first() -> None:
    dialogue, session = logged_in()
    idling = session.idle(lambda: None)
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n")
    listing = session.list_messages()
    dialogue.expect(b"DONE\r\n", b"M3 OK Idle completed.\r\n")
    dialogue.expect(b"M4 UID FETCH 1:* (UID RFC822.SIZE)\r\n", b"M4 OK done\r\n")
    assert result_of(listing) == [] and result_of(idling) is None


def test_done_before_the_server_said_idling_waits_for_it() -> None:
    dialogue, session = logged_in()
    idling = session.idle(lambda: None)
    stopping = session.done()
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n")
    dialogue.expect(b"DONE\r\n", b"M3 OK Idle completed.\r\n")
    assert result_of(stopping) is None and result_of(idling) is None


def test_idle_not_offered() -> None:
    dialogue, session = logged_in(capabilities=b"IMAP4rev1 UIDPLUS")
    error = failure_of(session.idle(lambda: None))
    assert isinstance(error, FetchError) and "IDLE" in str(error)
    assert dialogue.sent() == b""


def test_bye_during_idle_ends_it_with_the_servers_words() -> None:
    dialogue, session = logged_in()
    idling = session.idle(lambda: None)
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n* BYE Server shutting down.\r\n")
    dialogue.protocol.connectionLost(Failure(Exception("closed")))  # type: ignore[no-untyped-call]
    error = failure_of(idling)
    assert isinstance(error, FetchError) and "Server shutting down." in str(error)


def test_an_on_change_that_raises_does_not_break_the_session() -> None:
    dialogue, session = logged_in()

    def broken() -> None:
        raise RuntimeError("poller bug")

    idling = session.idle(broken)
    dialogue.expect(b"M3 IDLE\r\n", b"+ idling\r\n* 4 EXISTS\r\n")
    session.done()
    dialogue.expect(b"DONE\r\n", b"M3 OK done\r\n")
    assert result_of(idling) is None
    assert dialogue.protocol.error is None


# -- nonsense mid-session ---------------------------------------------------------------------------


def test_a_continuation_nobody_asked_for_ends_the_session() -> None:
    dialogue, session = logged_in()
    listing = session.list_messages()
    dialogue.sent()
    dialogue.server(b"+ send more\r\n")
    assert isinstance(failure_of(listing), ProtocolViolation)


def test_an_answer_to_a_command_never_sent_ends_the_session() -> None:
    dialogue, session = logged_in()
    listing = session.list_messages()
    dialogue.sent()
    dialogue.server(b"M9 OK done\r\n")
    assert isinstance(failure_of(listing), ProtocolViolation)
