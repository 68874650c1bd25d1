"""The POP3 client on a StringTransport and a Clock: each exchange and the server quirks.

`Dialogue` plays the server: `server(b"...")` feeds its bytes, `sent()` takes what the
client wrote since the last look. TLS is simulated: `startTLS` is recorded and
`handshake()` says the handshake completed.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.fetch import (
    AuthenticationFailed,
    FetchError,
    IMailboxSession,
    MailboxAccount,
    ProtocolViolation,
    RemoteMessage,
    TlsRefused,
)
from gateway.fetch._pop3_wire import MAX_LINE, Pop3Wire
from gateway.fetch.pop3 import Pop3Session, start_session

T = TypeVar("T")
PASSWORD = "s3cret-Pa55"
GREETING = b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"
CAPA = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nSASL PLAIN\r\n.\r\n"
CAPA_PIPELINING = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\n.\r\n"


@implementer(ITLSTransport)
class TlsStringTransport(StringTransport):  # type: ignore[misc]
    """A StringTransport that records STLS's startTLS instead of doing it."""

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
        "host": "pop.test",
        "port": 995,
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


def ignore(piece: bytes) -> None:
    """A writer that drops what it is given."""


def pending(deferred: Deferred[Any]) -> bool:
    return not deferred.called


class Dialogue:
    def __init__(self, **changes: Any) -> None:
        self.account = account(**changes)
        self.clock = Clock()
        self.wire = Pop3Wire(
            self.clock, "pop.test:995", self.account.timeout, implicit_tls=self.account.tls == "implicit"
        )
        self.transport = TlsStringTransport()
        self.wire.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        if self.account.tls == "implicit":
            self.wire.handshakeCompleted()
        self.login = start_session(self.account, self.wire)

    def server(self, text: bytes) -> None:
        self.wire.dataReceived(text)

    def sent(self) -> bytes:
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        self.transport.clear()  # type: ignore[no-untyped-call]
        return value

    def handshake(self) -> None:
        self.wire.handshakeCompleted()

    def logged_in(self, capa: bytes = CAPA) -> Pop3Session:
        """Greeting, CAPA, USER/PASS: the usual login over TLS."""
        self.server(GREETING)
        assert self.sent() == b"CAPA\r\n"
        self.server(capa)
        assert self.sent() == b"USER alice\r\n"
        self.server(b"+OK\r\n")
        assert self.sent() == f"PASS {PASSWORD}\r\n".encode()
        self.server(b"+OK maildrop has 2 messages\r\n")
        return result_of(self.login)


def listed(dialogue: Dialogue, session: Pop3Session, listing: bytes, uidl: bytes) -> list[RemoteMessage]:
    messages = session.list_messages()
    assert dialogue.sent() == b"LIST\r\n"
    dialogue.server(listing)
    assert dialogue.sent() == b"UIDL\r\n"
    dialogue.server(uidl)
    return result_of(messages)


TWO_LISTED = b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"
TWO_UIDS = b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n"


# -- login ---------------------------------------------------------------------------------------


def test_login_over_implicit_tls_uses_user_pass_even_when_apop_is_offered() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    assert IMailboxSession.providedBy(session)
    assert "SASL PLAIN" in session.capabilities and session.has("SASL") and session.has("TOP")
    assert not dialogue.wire.pipelining


def test_the_login_waits_for_the_greeting() -> None:
    dialogue = Dialogue()
    assert dialogue.sent() == b""
    assert pending(dialogue.login)


def test_a_refusing_greeting_is_a_fetch_error_and_nothing_is_sent() -> None:
    dialogue = Dialogue()
    dialogue.server(b"-ERR [SYS/TEMP] too many connections\r\n")
    error = failure_of(dialogue.login)
    assert type(error) is FetchError and "too many connections" in str(error)
    assert dialogue.sent() == b""
    assert dialogue.transport.aborted


def test_a_server_without_capa_is_served_one_command_at_a_time() -> None:
    dialogue = Dialogue()
    dialogue.server(GREETING)
    assert dialogue.sent() == b"CAPA\r\n"
    dialogue.server(b"-ERR unknown command\r\n")
    assert dialogue.sent() == b"USER alice\r\n"
    dialogue.server(b"+OK\r\n")
    dialogue.sent()
    dialogue.server(b"+OK\r\n")
    session = result_of(dialogue.login)
    assert not session.capa_known and session.capabilities == frozenset()
    assert [m.uid for m in listed(dialogue, session, TWO_LISTED, TWO_UIDS)] == [
        "whqtswO00WBw418f9t5JxYwZ",
        "QhdPYR:00WBw1Ph7x7",
    ]


def test_wrong_password_is_authentication_failed_and_the_password_is_in_no_error() -> None:
    dialogue = Dialogue()
    dialogue.server(GREETING + CAPA)
    dialogue.server(b"+OK\r\n")
    dialogue.server(b"-ERR [AUTH] Authentication failed.\r\n")
    error = failure_of(dialogue.login)
    assert isinstance(error, AuthenticationFailed)
    assert "Authentication failed" in str(error) and "alice" in str(error)
    assert PASSWORD not in str(error) and PASSWORD not in repr(dialogue.account)
    assert dialogue.transport.aborted


def test_err_to_user_is_authentication_failed_without_sending_the_password() -> None:
    dialogue = Dialogue()
    dialogue.server(GREETING + CAPA)
    dialogue.sent()
    dialogue.server(b"-ERR no such user\r\n")
    assert isinstance(failure_of(dialogue.login), AuthenticationFailed)
    assert PASSWORD.encode() not in dialogue.sent()


@pytest.mark.parametrize("code", [b"IN-USE", b"LOGIN-DELAY", b"SYS/TEMP"])
def test_a_busy_mailbox_is_not_a_wrong_password(code: bytes) -> None:
    dialogue = Dialogue()
    dialogue.server(GREETING + CAPA)
    dialogue.server(b"+OK\r\n")
    dialogue.server(b"-ERR [" + code + b"] try again later\r\n")
    error = failure_of(dialogue.login)
    assert type(error) is FetchError and code.decode() in str(error)


def test_apop_on_a_plain_connection_with_the_rfc_1939_example() -> None:
    dialogue = Dialogue(tls="none", username="mrose", password="tanstaaf", port=110)
    dialogue.server(GREETING + CAPA)
    assert dialogue.sent() == b"CAPA\r\nAPOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"
    dialogue.server(b"+OK mrose's maildrop has 2 messages (320 octets)\r\n")
    result_of(dialogue.login)


def test_plain_text_user_pass_only_for_an_insecure_account_without_apop() -> None:
    dialogue = Dialogue(tls="none", port=110)
    dialogue.server(b"+OK ready\r\n" + CAPA)
    assert dialogue.sent() == b"CAPA\r\nUSER alice\r\n"


def test_apop_asked_for_but_not_offered_sends_nothing() -> None:
    dialogue = Dialogue(auth="apop")
    dialogue.server(b"+OK ready\r\n" + CAPA)
    error = failure_of(dialogue.login)
    assert isinstance(error, AuthenticationFailed) and "APOP" in str(error)
    assert dialogue.sent() == b"CAPA\r\n"


def test_a_password_with_a_line_break_is_never_sent() -> None:
    dialogue = Dialogue(password="x\r\nDELE 1")
    dialogue.server(GREETING + CAPA)
    assert isinstance(failure_of(dialogue.login), AuthenticationFailed)
    assert dialogue.sent() == b"CAPA\r\n"


def test_an_unknown_auth_mode_is_refused_before_the_greeting_is_used() -> None:
    dialogue = Dialogue(auth="kerberos")
    assert "kerberos" in str(failure_of(dialogue.login))
    assert dialogue.transport.aborted


# -- STLS ------------------------------------------------------------------------------------------


def stls_dialogue() -> Dialogue:
    dialogue = Dialogue(tls="starttls", port=110)
    dialogue.server(GREETING)
    assert dialogue.sent() == b"CAPA\r\n"
    dialogue.server(b"+OK\r\nUSER\r\nSTLS\r\n.\r\n")
    assert dialogue.sent() == b"STLS\r\n"
    return dialogue


def test_stls_starts_tls_then_asks_capa_again_and_only_then_logs_in() -> None:
    dialogue = stls_dialogue()
    dialogue.server(b"+OK Begin TLS negotiation\r\n")
    assert dialogue.transport.tls_options is not None
    assert dialogue.sent() == b""  # nothing until the handshake is done
    dialogue.handshake()
    assert dialogue.sent() == b"CAPA\r\n"
    dialogue.server(CAPA_PIPELINING)
    assert dialogue.sent() == b"USER alice\r\n"
    dialogue.server(b"+OK\r\n")
    assert dialogue.sent() == f"PASS {PASSWORD}\r\n".encode()
    dialogue.server(b"+OK\r\n")
    session = result_of(dialogue.login)
    assert not session.has("STLS") and session.has("PIPELINING")  # the plain-text CAPA is forgotten
    assert dialogue.wire.pipelining


def test_bytes_injected_after_the_stls_ok_are_refused() -> None:
    dialogue = stls_dialogue()
    dialogue.server(b"+OK Begin TLS\r\n+OK injected\r\n")
    error = failure_of(dialogue.login)
    assert isinstance(error, ProtocolViolation) and "after its +OK to STLS" in str(error)
    assert dialogue.transport.tls_options is None
    assert dialogue.transport.aborted
    assert dialogue.sent() == b""


def test_a_server_without_stls_is_refused_when_the_account_requires_it() -> None:
    dialogue = Dialogue(tls="starttls", port=110)
    dialogue.server(GREETING + b"+OK\r\nUSER\r\n.\r\n")
    error = failure_of(dialogue.login)
    assert isinstance(error, TlsRefused) and "STLS" in str(error)
    assert dialogue.sent() == b"CAPA\r\n"


def test_err_to_stls_is_tls_refused_and_no_password_follows() -> None:
    dialogue = stls_dialogue()
    dialogue.server(b"-ERR not now\r\n")
    assert isinstance(failure_of(dialogue.login), TlsRefused)
    assert dialogue.sent() == b""


def test_stls_is_tried_on_a_server_without_capa() -> None:
    dialogue = Dialogue(tls="starttls", port=110)
    dialogue.server(GREETING + b"-ERR what?\r\n")
    assert dialogue.sent() == b"CAPA\r\nSTLS\r\n"


def test_a_handshake_that_fails_is_tls_refused() -> None:
    dialogue = stls_dialogue()
    dialogue.server(b"+OK\r\n")
    dialogue.wire.connectionLost(Failure(Exception("certificate verify failed")))  # type: ignore[no-untyped-call]
    error = failure_of(dialogue.login)
    assert isinstance(error, TlsRefused) and "certificate verify failed" in str(error)


# -- listing ---------------------------------------------------------------------------------------


def test_list_and_uidl_give_the_messages_in_server_order() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    messages = listed(dialogue, session, TWO_LISTED, TWO_UIDS)
    assert messages == [
        RemoteMessage(uid="whqtswO00WBw418f9t5JxYwZ", size=120, number=1),
        RemoteMessage(uid="QhdPYR:00WBw1Ph7x7", size=200, number=2),
    ]


def test_with_pipelining_list_and_uidl_go_out_together() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(CAPA_PIPELINING)
    messages = session.list_messages()
    assert dialogue.sent() == b"LIST\r\nUIDL\r\n"
    dialogue.server(TWO_LISTED + TWO_UIDS)
    assert len(result_of(messages)) == 2


def test_an_empty_maildrop() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    assert listed(dialogue, session, b"+OK 0 messages\r\n.\r\n", b"+OK\r\n.\r\n") == []


def test_a_malformed_list_line_is_a_protocol_violation() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    messages = session.list_messages()
    dialogue.server(b"+OK\r\n1 lots\r\n.\r\n+OK\r\n1 a\r\n.\r\n")
    assert isinstance(failure_of(messages), ProtocolViolation)


HEADERS_ONE = b"+OK\r\nFrom: a@example.net\r\nSubject: one\r\nStatus: RO\r\n\r\n.\r\n"
HEADERS_ONE_UNREAD = b"+OK\r\nFrom: a@example.net\r\nSubject: one\r\n\r\n.\r\n"


@pytest.mark.parametrize(
    "uidl",
    [
        b"-ERR no UIDL here\r\n",
        b"+OK\r\n1 same\r\n2 same\r\n.\r\n",  # duplicate ids
        b"+OK\r\n1 abc\r\n.\r\n",  # an id missing
        b"+OK\r\n1 abc\r\n2 d e f\r\n.\r\n",  # spaces in an id
        b"+OK\r\n1 abc\r\n3 def\r\n.\r\n",  # a number LIST does not have
    ],
    ids=["missing", "duplicate", "short", "spaces", "unknown-number"],
)
def test_broken_uidl_falls_back_to_a_digest_of_the_headers(uidl: bytes) -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    messages = session.list_messages()
    dialogue.server(TWO_LISTED + uidl)
    assert dialogue.sent() == b"LIST\r\nUIDL\r\nTOP 1 0\r\n"
    dialogue.server(HEADERS_ONE)
    assert dialogue.sent() == b"TOP 2 0\r\n"
    dialogue.server(HEADERS_ONE_UNREAD)
    first, second = result_of(messages)
    # Identical headers but for Status (rewritten by mbox servers on reading): the same digest,
    # told apart by their order.
    assert first.uid.startswith("hdr-") and second.uid == first.uid + "-2"
    assert (first.number, first.size, second.number) == (1, 120, 2)
    assert session.header_ids
    # Next time the broken UIDL is not asked again, and the same messages get the same ids.
    again = session.list_messages()
    assert dialogue.sent() == b"LIST\r\n"
    dialogue.server(TWO_LISTED)
    dialogue.server(HEADERS_ONE_UNREAD)
    dialogue.server(HEADERS_ONE)
    assert [m.uid for m in result_of(again)] == [first.uid, second.uid]


def test_different_headers_have_different_digests() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(CAPA_PIPELINING)
    messages = session.list_messages()
    dialogue.server(TWO_LISTED + b"-ERR\r\n")
    assert dialogue.sent() == b"LIST\r\nUIDL\r\nTOP 1 0\r\n"  # TOP is tried once before the rest
    dialogue.server(HEADERS_ONE)
    dialogue.server(b"+OK\r\nSubject: two\r\n\r\n.\r\n")
    first, second = result_of(messages)
    assert first.uid != second.uid and not second.uid.startswith(first.uid)


def test_no_uidl_and_no_top_is_refused_rather_than_fetching_duplicates() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    messages = session.list_messages()
    dialogue.server(TWO_LISTED + b"-ERR\r\n" + b"-ERR no TOP\r\n")
    error = failure_of(messages)
    assert type(error) is FetchError and "cannot be told apart" in str(error)


# -- retrieving ------------------------------------------------------------------------------------

MESSAGE = RemoteMessage(uid="a", size=120, number=1)


def test_retr_is_dot_unstuffed_with_crlf_kept_and_streamed_as_it_arrives() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    pieces: list[bytes] = []
    octets = session.retrieve(MESSAGE, pieces.append)
    assert dialogue.sent() == b"RETR 1\r\n"
    dialogue.server(b"+OK 120 octets\r\nSubject: dots\r\n\r\n..leading dot\r\n...\r\n")
    assert b"".join(pieces) == b"Subject: dots\r\n\r\n.leading dot\r\n..\r\n"  # before the end arrived
    assert pending(octets)
    dialogue.server(b"bare LF line\nmiddle .. dot\r\n.\r\n")
    whole = b"Subject: dots\r\n\r\n.leading dot\r\n..\r\nbare LF line\r\nmiddle .. dot\r\n"
    assert b"".join(pieces) == whole
    assert result_of(octets) == len(whole)
    assert len(pieces) == 2


def test_a_terminator_split_across_reads() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    pieces: list[bytes] = []
    octets = session.retrieve(MESSAGE, pieces.append)
    dialogue.server(b"+OK\r\nbody\r\n.")
    dialogue.server(b"\r")
    assert pending(octets)
    dialogue.server(b"\n")
    assert result_of(octets) == 6 and b"".join(pieces) == b"body\r\n"


def test_a_message_with_a_very_long_line_streams_in_bounded_pieces() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    pieces: list[bytes] = []
    line = b"." + b"x" * 300_000
    octets = session.retrieve(RemoteMessage("a", len(line) + 4, 1), pieces.append)
    dialogue.server(b"+OK\r\n")
    for start in range(0, len(line), 70_000):
        dialogue.server(line[start : start + 70_000])
        assert len(dialogue.wire._buffer) <= 70_000
    dialogue.server(b"\r\n.\r\n")
    assert b"".join(pieces) == line[1:] + b"\r\n"
    assert result_of(octets) == len(line) + 1


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_split_of_an_answer_reads_the_same(cuts: list[int]) -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    pieces: list[bytes] = []
    octets = session.retrieve(MESSAGE, pieces.append)
    answer = b"+OK\r\n..a\r\n.\r\r\nb\nc\r\n..\r\n.\r\n"
    position = 0
    for cut in cuts:
        dialogue.server(answer[position : position + cut])
        position += cut
    dialogue.server(answer[position:])
    # ".\r" is a stuffed line holding a CR, not the end; a bare LF becomes CRLF
    assert b"".join(pieces) == b".a\r\n\r\r\nb\r\nc\r\n.\r\n"
    assert result_of(octets) == len(b".a\r\n\r\r\nb\r\nc\r\n.\r\n")


def test_err_to_retr_is_a_fetch_error_and_the_session_goes_on() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    octets = session.retrieve(MESSAGE, ignore)
    dialogue.server(b"-ERR no such message\r\n")
    assert type(failure_of(octets)) is FetchError
    assert not dialogue.transport.aborted


def test_without_pipelining_the_next_retr_waits_for_the_previous_answer() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    first, second = [], []  # type: ignore[var-annotated]
    one = session.retrieve(MESSAGE, first.append)
    two = session.retrieve(RemoteMessage("b", 10, 2), second.append)
    assert dialogue.sent() == b"RETR 1\r\n"
    dialogue.server(b"+OK\r\none\r\n.\r\n")
    assert dialogue.sent() == b"RETR 2\r\n"
    dialogue.server(b"+OK\r\ntwo\r\n.\r\n")
    assert (result_of(one), result_of(two)) == (5, 5)
    assert (first, second) == ([b"one\r\n"], [b"two\r\n"])


def test_with_pipelining_retrs_go_out_at_once_and_answers_are_matched_in_order() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(CAPA_PIPELINING)
    bodies: dict[int, list[bytes]] = {1: [], 2: [], 3: []}
    results = [session.retrieve(RemoteMessage(str(n), 10, n), bodies[n].append) for n in (1, 2, 3)]
    assert dialogue.sent() == b"RETR 1\r\nRETR 2\r\nRETR 3\r\n"
    dialogue.server(b"+OK\r\none\r\n.\r\n+OK\r\ntwo\r\n.\r\n-ERR gone\r\n")
    assert [result_of(results[0]), result_of(results[1])] == [5, 5]
    assert isinstance(failure_of(results[2]), FetchError)
    assert bodies == {1: [b"one\r\n"], 2: [b"two\r\n"], 3: []}


def test_a_writer_that_fails_fails_the_retrieve_and_drops_the_session() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()

    def full(piece: bytes) -> None:
        raise OSError(28, "No space left on device")

    octets = session.retrieve(MESSAGE, full)
    dialogue.server(b"+OK\r\nline\r\n")
    assert isinstance(failure_of(octets), OSError)
    assert dialogue.transport.aborted


def test_a_message_far_larger_than_announced_is_cut_off() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    octets = session.retrieve(RemoteMessage("a", 10, 1), ignore)
    dialogue.server(b"+OK\r\n")
    chunk = (b"y" * 998 + b"\r\n") * 100
    for _ in range(12):
        dialogue.server(chunk)
    assert isinstance(failure_of(octets), ProtocolViolation)
    assert dialogue.transport.aborted


def test_top_gives_the_header_and_some_lines() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    pieces: list[bytes] = []
    octets = session.top(MESSAGE, 1, pieces.append)
    assert dialogue.sent() == b"TOP 1 1\r\n"
    dialogue.server(b"+OK\r\nSubject: x\r\n\r\nfirst\r\n.\r\n")
    assert result_of(octets) == 21 and b"".join(pieces) == b"Subject: x\r\n\r\nfirst\r\n"


def test_a_message_without_a_number_is_refused() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    with pytest.raises(FetchError):
        session.retrieve(RemoteMessage("a", 1), ignore)


# -- bounds, nonsense, timeouts ------------------------------------------------------------------


def test_an_over_long_status_line_is_a_protocol_violation() -> None:
    dialogue = Dialogue()
    dialogue.server(b"+OK " + b"x" * (MAX_LINE + 10))
    assert isinstance(failure_of(dialogue.login), ProtocolViolation)
    assert dialogue.transport.aborted


def test_an_over_long_listing_line_is_a_protocol_violation() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    messages = session.list_messages()
    dialogue.server(b"+OK\r\n1 " + b"9" * (MAX_LINE + 10) + b"\r\n")
    assert isinstance(failure_of(messages), ProtocolViolation)


def test_neither_ok_nor_err_is_a_protocol_violation() -> None:
    dialogue = Dialogue()
    dialogue.server(b"220 smtp.test ESMTP\r\n")
    error = failure_of(dialogue.login)
    assert isinstance(error, ProtocolViolation) and "neither +OK nor -ERR" in str(error)


def test_an_answer_nobody_asked_for_is_a_protocol_violation() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    dialogue.server(b"+OK surprise\r\n")
    assert dialogue.transport.aborted
    assert isinstance(failure_of(session.list_messages()), ProtocolViolation)


def test_a_silent_server_times_out_after_the_account_timeout() -> None:
    dialogue = Dialogue(timeout=30.0)
    dialogue.clock.advance(29.9)
    assert pending(dialogue.login)
    dialogue.clock.advance(0.2)
    error = failure_of(dialogue.login)
    assert type(error) is FetchError and "30 s" in str(error) and "greeting" in str(error)
    assert dialogue.transport.aborted


def test_the_timeout_is_for_silence_not_for_a_long_message() -> None:
    dialogue = Dialogue(timeout=30.0)
    session = dialogue.logged_in()
    octets = session.retrieve(MESSAGE, ignore)
    dialogue.server(b"+OK\r\n")
    for _ in range(5):
        dialogue.clock.advance(20)
        dialogue.server(b"more\r\n")
    assert pending(octets)
    dialogue.clock.advance(31)
    error = failure_of(octets)
    assert "RETR 1" in str(error)


def test_no_timer_is_left_when_idle() -> None:
    dialogue = Dialogue()
    dialogue.logged_in()
    assert dialogue.clock.getDelayedCalls() == []


# -- deleting and closing ------------------------------------------------------------------------


def test_delete_then_close_sends_dele_and_quit_and_waits_for_quits_ok() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in(CAPA_PIPELINING)
    deleted = session.delete([MESSAGE, RemoteMessage("b", 5, 2)])
    assert dialogue.sent() == b"DELE 1\r\nDELE 2\r\n"
    dialogue.server(b"+OK message 1 deleted\r\n+OK message 2 deleted\r\n")
    result_of(deleted)
    closed = session.close()
    assert dialogue.sent() == b"QUIT\r\n"
    assert pending(closed)
    dialogue.server(b"+OK bye\r\n")
    result_of(closed)
    assert dialogue.transport.disconnecting


def test_err_to_dele_is_a_fetch_error() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    deleted = session.delete([MESSAGE])
    dialogue.server(b"-ERR message 1 already deleted\r\n")
    assert "DELE 1" in str(failure_of(deleted))


def test_err_to_quit_says_deletions_were_not_done() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    closed = session.close()
    dialogue.server(b"-ERR some deleted messages not removed\r\n")
    error = failure_of(closed)
    assert type(error) is FetchError and "deletions not done" in str(error)


def test_a_connection_lost_before_quits_ok_fails_the_close() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    closed = session.close()
    dialogue.wire.connectionLost(Failure(ConnectionResetError("reset")))  # type: ignore[no-untyped-call]
    error = failure_of(closed)
    assert type(error) is FetchError and "QUIT" in str(error)


def test_abort_sends_nothing_and_fails_what_is_waiting() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    octets = session.retrieve(MESSAGE, ignore)
    dialogue.sent()
    session.abort()
    assert dialogue.transport.aborted and dialogue.sent() == b""
    assert isinstance(failure_of(octets), FetchError)


def test_a_connection_lost_mid_message_is_a_fetch_error() -> None:
    dialogue = Dialogue()
    session = dialogue.logged_in()
    pieces: list[bytes] = []
    octets = session.retrieve(MESSAGE, pieces.append)
    dialogue.server(b"+OK\r\nhalf a mess")
    dialogue.wire.connectionLost(Failure(ConnectionResetError("reset")))  # type: ignore[no-untyped-call]
    error = failure_of(octets)
    assert type(error) is FetchError and "RETR 1" in str(error)
    assert isinstance(failure_of(session.list_messages()), FetchError)


def test_apop_digest_matches_rfc_1939() -> None:
    # The example of RFC 1939 7, computed here too: a check on the test's constant.
    digest = hashlib.md5(b"<1896.697170952@dbc.mtview.ca.us>tanstaaf", usedforsecurity=False).hexdigest()
    assert digest == "c4c9334bac560ecc979e58001b3e22fb"
