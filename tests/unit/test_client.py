"""The SMTP/LMTP client session on a StringTransport and a Clock: readable dialogues.

`Dialogue.server(...)` feeds the server's bytes; `Dialogue.sent()` takes what the
client wrote since the last look.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.model import Body, Envelope, Notify, Recipient, Ret
from gateway.smtp._client_protocol import ClientError, ClientProtocol
from gateway.smtp.client import (
    AuthCredentials,
    ClientSession,
    ClientSettings,
    Outcome,
    SessionFailure,
    TlsPolicy,
)

T = TypeVar("T")
PEER = "mx.test[192.0.2.1]:25"
EHLO_FULL = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
)


@implementer(ITLSTransport)
class TlsStringTransport(StringTransport):  # type: ignore[misc]
    """A StringTransport that records STARTTLS instead of doing it."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tls_options: object = None
        self.aborted = False

    def startTLS(self, options: object) -> None:
        self.tls_options = options

    def abortConnection(self) -> None:
        self.aborted = True


def result_of(deferred: Deferred[T]) -> T:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def failure_of(deferred: Deferred[Any]) -> BaseException:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results and isinstance(results[0], Failure), f"expected a failure, got {results}"
    error: BaseException = results[0].value  # type: ignore[assignment]
    return error


class Dialogue:
    def __init__(self, *, lmtp: bool = False, settings: ClientSettings | None = None) -> None:
        self.clock = Clock()
        self.settings = settings or ClientSettings("gw.test")
        self.protocol = ClientProtocol(self.clock, PEER, self.settings.helo_timeout)
        self.transport = TlsStringTransport()
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.session = ClientSession(self.protocol, self.settings, PEER, lmtp=lmtp)

    def server(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        self.transport.clear()  # type: ignore[no-untyped-call]
        return value

    def open(self, ehlo: bytes = EHLO_FULL, policy: TlsPolicy = TlsPolicy.NONE) -> None:
        opened = ensureDeferred(self.session.open(policy, None))
        self.server(b"220 mx.test ESMTP\r\n")
        assert self.sent() in (b"EHLO gw.test\r\n", b"LHLO gw.test\r\n")
        self.server(ehlo)
        result_of(opened)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionError("gone")))  # type: ignore[no-untyped-call]


def message_file(tmp_path: Path, content: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> str:
    path = tmp_path / "message"
    path.write_bytes(content)
    return str(path)


ENVELOPE = Envelope("a@example.org", (Recipient("b@example.net"), Recipient("c@example.net")))


def deliver(
    dialogue: Dialogue, path: str, envelope: Envelope = ENVELOPE, size: int = 100
) -> Deferred[list[Outcome]]:
    return ensureDeferred(dialogue.session.deliver(envelope, envelope.rcpt_to, path, size))


# -- greeting and EHLO -------------------------------------------------------------------


def test_greeting_refused_is_a_session_failure_with_the_servers_reply() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.server(b"554 5.3.2 go away\r\n")
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert (error.code, error.enhanced) == (554, "5.3.2")
    assert error.text == f"host {PEER} refused to talk to me: 554 5.3.2 go away"
    assert dialogue.sent() == b"QUIT\r\n"


def test_greeting_timeout() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.clock.advance(299)
    assert not opened.called
    dialogue.clock.advance(1)
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.code == 451
    assert error.text == f"conversation with {PEER} timed out while receiving the initial server greeting"
    assert dialogue.transport.aborted


def test_connection_lost_during_greeting() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.lose()
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.text == f"lost connection with {PEER} while receiving the initial server greeting"


def test_ehlo_refused_falls_back_to_helo() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.MAY))
    dialogue.server(b"220 old.test SMTP\r\n")
    assert dialogue.sent() == b"EHLO gw.test\r\n"
    dialogue.server(b"502 what?\r\n")
    assert dialogue.sent() == b"HELO gw.test\r\n"
    dialogue.server(b"250 old.test\r\n")
    result_of(opened)
    assert not dialogue.session.esmtp
    assert dialogue.session.extensions == {}


def test_helo_refused_too() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.server(b"220 old.test SMTP\r\n502 no\r\n")
    dialogue.server(b"501 no either\r\n")
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.code == 501
    assert "(in reply to HELO command)" in error.text


def test_ehlo_keywords_parsed() -> None:
    dialogue = Dialogue()
    dialogue.open()
    assert dialogue.session.extensions["SIZE"] == "10000"
    assert {"PIPELINING", "8BITMIME", "SMTPUTF8", "DSN"} <= set(dialogue.session.extensions)


def test_malformed_reply_aborts() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.server(b"hello there\r\n")
    assert dialogue.transport.aborted
    dialogue.lose()
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert "malformed reply" in error.text


def test_over_long_reply_line_aborts() -> None:
    dialogue = Dialogue()
    ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.server(b"220-" + b"x" * 10000)
    assert dialogue.transport.aborted


# -- STARTTLS ----------------------------------------------------------------------------


def test_starttls_when_offered_and_ehlo_again() -> None:
    dialogue = Dialogue()
    options = object()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.MAY, options))
    dialogue.server(b"220 mx.test\r\n")
    dialogue.sent()
    dialogue.server(b"250-mx.test\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n")
    assert dialogue.sent() == b"STARTTLS\r\n"
    dialogue.server(b"220 2.0.0 go ahead\r\n")
    assert dialogue.transport.tls_options is options
    assert dialogue.sent() == b"EHLO gw.test\r\n"
    dialogue.server(b"250-mx.test\r\n250 PIPELINING\r\n")
    result_of(opened)
    assert dialogue.session.tls
    assert set(dialogue.session.extensions) == {"PIPELINING"}


def test_starttls_response_injection_is_discarded() -> None:
    """R7: plaintext after the 220 to STARTTLS must not be read as the TLS EHLO reply."""
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.MAY, object()))
    dialogue.server(b"220 mx.test\r\n")
    dialogue.sent()
    dialogue.server(b"250-mx.test\r\n250 STARTTLS\r\n")
    dialogue.sent()
    dialogue.server(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
    assert dialogue.sent() == b"EHLO gw.test\r\n"
    assert not opened.called  # still waiting for the real (TLS) EHLO reply
    dialogue.server(b"250-mx.test\r\n250 AUTH CRAM-MD5\r\n")
    result_of(opened)
    assert dialogue.session.extensions == {"AUTH": "CRAM-MD5"}


def test_starttls_required_but_not_offered() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.ENCRYPT, object()))
    dialogue.server(b"220 mx.test\r\n250 mx.test\r\n")
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert (error.code, error.enhanced) == (451, "4.7.4")
    assert error.text == f"TLS is required, but was not offered by host {PEER}"


def test_starttls_refused_under_may_carries_on_in_plaintext() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.MAY, object()))
    dialogue.server(b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n")
    dialogue.sent()
    dialogue.server(b"454 4.7.0 TLS not available\r\n")
    result_of(opened)
    assert not dialogue.session.tls


def test_starttls_refused_under_verify_fails() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.VERIFY, object()))
    dialogue.server(b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n454 4.7.0 no TLS\r\n")
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.code == 451
    assert "refused to start TLS" in error.text


def test_tls_handshake_failure_is_reported_as_tls() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(dialogue.session.open(TlsPolicy.VERIFY, object()))
    dialogue.server(b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n220 go\r\n")
    dialogue.protocol.connectionLost(Failure(Exception("certificate verify failed")))  # type: ignore[no-untyped-call]
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.tls_failed
    assert (error.code, error.enhanced) == (451, "4.7.5")
    assert error.text == f"TLS handshake with {PEER} failed: certificate verify failed"


# -- AUTH --------------------------------------------------------------------------------


def open_with_auth(
    mechanisms: bytes, credentials: AuthCredentials, tls: bool = True
) -> tuple[Dialogue, Deferred[None]]:
    dialogue = Dialogue()
    opened = ensureDeferred(
        dialogue.session.open(TlsPolicy.MAY if tls else TlsPolicy.NONE, object(), credentials)
    )
    dialogue.server(b"220 mx.test\r\n")
    if tls:
        dialogue.server(b"250-mx.test\r\n250 STARTTLS\r\n220 go\r\n")
    dialogue.server(b"250-mx.test\r\n250 AUTH " + mechanisms + b"\r\n")
    dialogue.sent()
    return dialogue, opened


def test_auth_plain() -> None:
    dialogue, opened = open_with_auth(b"LOGIN PLAIN", AuthCredentials("alice", "secret"))
    # EHLO was the last before AUTH; sent() cleared it
    dialogue.server(b"235 2.7.0 ok\r\n")
    result_of(opened)
    assert dialogue.session.authenticated


def test_auth_plain_bytes_on_the_wire() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(
        dialogue.session.open(TlsPolicy.MAY, object(), AuthCredentials("alice", "secret"))
    )
    dialogue.server(b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n220 go\r\n")
    dialogue.sent()
    dialogue.server(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n")
    assert dialogue.sent() == b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"
    dialogue.server(b"235 ok\r\n")
    result_of(opened)


def test_auth_login() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(
        dialogue.session.open(TlsPolicy.MAY, object(), AuthCredentials("alice", "secret"))
    )
    dialogue.server(b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n220 go\r\n")
    dialogue.sent()
    dialogue.server(b"250-mx.test\r\n250 AUTH LOGIN\r\n")
    assert dialogue.sent() == b"AUTH LOGIN\r\n"
    dialogue.server(b"334 VXNlcm5hbWU6\r\n")
    assert dialogue.sent() == base64.b64encode(b"alice") + b"\r\n"
    dialogue.server(b"334 UGFzc3dvcmQ6\r\n")
    assert dialogue.sent() == base64.b64encode(b"secret") + b"\r\n"
    dialogue.server(b"235 ok\r\n")
    result_of(opened)
    assert dialogue.session.authenticated


def test_auth_cram_md5() -> None:
    dialogue = Dialogue()
    opened = ensureDeferred(
        dialogue.session.open(TlsPolicy.MAY, object(), AuthCredentials("alice", "secret"))
    )
    dialogue.server(b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n220 go\r\n")
    dialogue.sent()
    dialogue.server(b"250-mx.test\r\n250 AUTH CRAM-MD5\r\n")
    assert dialogue.sent() == b"AUTH CRAM-MD5\r\n"
    challenge = b"<1896.697170952@mx.test>"
    dialogue.server(b"334 " + base64.b64encode(challenge) + b"\r\n")
    digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
    assert dialogue.sent() == base64.b64encode(b"alice " + digest) + b"\r\n"
    dialogue.server(b"235 ok\r\n")
    result_of(opened)


def test_auth_failure_is_transient_with_the_servers_words() -> None:
    dialogue, opened = open_with_auth(b"PLAIN", AuthCredentials("alice", "wrong"))
    dialogue.server(b"535 5.7.8 bad credentials\r\n")
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.text == f"SASL authentication failed; server {PEER} said: 535 5.7.8 bad credentials"


def test_no_credentials_over_plaintext() -> None:
    dialogue, opened = open_with_auth(b"PLAIN", AuthCredentials("alice", "secret"), tls=False)
    error = failure_of(opened)
    assert isinstance(error, SessionFailure)
    assert error.code == 451
    assert "without TLS" in error.text
    assert b"AUTH" not in dialogue.sent()


def test_credentials_over_plaintext_when_allowed_prefer_cram_md5() -> None:
    dialogue, _opened = open_with_auth(
        b"PLAIN CRAM-MD5", AuthCredentials("a", "s", allow_plaintext=True), tls=False
    )
    assert dialogue.sent() == b""  # the EHLO was cleared; AUTH went with it
    assert dialogue.transport.tls_options is None


# -- transactions ------------------------------------------------------------------------


def test_pipelined_transaction_with_mixed_recipients(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    assert dialogue.sent() == (
        b"MAIL FROM:<a@example.org> SIZE=100\r\n"
        b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    dialogue.server(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert dialogue.sent() == b"Subject: hi\r\n\r\nbody\r\n.\r\n"
    dialogue.server(b"250 2.0.0 Ok: queued as ABC\r\n")
    first, second = result_of(delivered)
    assert (first.result.code, first.result.enhanced) == (550, "5.1.1")
    assert first.result.text == f"host {PEER} said: 550 5.1.1 no such user (in reply to RCPT TO command)"
    assert not first.failover
    assert second.result.delivered
    assert second.result.text == "250 2.0.0 Ok: queued as ABC"
    assert second.result.relay == PEER


def test_transaction_without_pipelining_waits_for_each_reply(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open(b"250-mx.test\r\n250 8BITMIME\r\n")
    delivered = deliver(dialogue, message_file(tmp_path))
    assert dialogue.sent() == b"MAIL FROM:<a@example.org>\r\n"
    dialogue.server(b"250 ok\r\n")
    assert dialogue.sent() == b"RCPT TO:<b@example.net>\r\n"
    dialogue.server(b"450 4.2.0 greylisted\r\n")
    assert dialogue.sent() == b"RCPT TO:<c@example.net>\r\n"
    dialogue.server(b"250 ok\r\n")
    assert dialogue.sent() == b"DATA\r\n"
    dialogue.server(b"354 go\r\n")
    assert dialogue.sent().endswith(b".\r\n")
    dialogue.server(b"250 ok\r\n")
    first, second = result_of(delivered)
    assert first.result.code == 450 and first.failover
    assert second.result.delivered


def test_mail_from_refused_applies_to_all(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.sent()
    dialogue.server(b"451 4.3.0 try later\r\n503 no mail\r\n503 no mail\r\n503 no\r\n")
    outcomes = result_of(delivered)
    assert [o.result.code for o in outcomes] == [451, 451]
    assert all(o.failover for o in outcomes)
    assert "(in reply to MAIL FROM command)" in outcomes[0].result.text


def test_data_refused_applies_to_every_accepted_recipient(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.sent()
    dialogue.server(b"250 ok\r\n250 ok\r\n250 ok\r\n554 5.7.1 not today\r\n")
    assert [o.result.code for o in result_of(delivered)] == [554, 554]


def test_end_of_data_5xx_applies_to_every_accepted_recipient(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.server(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n")
    dialogue.server(b"552 5.3.4 too big\r\n")
    first, second = result_of(delivered)
    assert (first.result.code, second.result.code) == (552, 550)
    assert "(in reply to end of DATA command)" in first.result.text


def test_no_recipient_accepted_but_354_ends_an_empty_message(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.sent()
    dialogue.server(b"250 ok\r\n550 no\r\n550 no\r\n354 go anyway\r\n")
    assert dialogue.sent() == b".\r\n"  # never the message
    dialogue.server(b"554 no valid recipients\r\n")
    assert [o.result.code for o in result_of(delivered)] == [550, 550]


def test_esmtp_parameters(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    envelope = Envelope(
        "a@example.org",
        (Recipient("b@example.net", frozenset({Notify.FAILURE, Notify.DELAY}), "rfc822;B+x@example.net"),),
        body=Body.EIGHT_BIT,
        smtputf8=True,
        ret=Ret.HDRS,
        envid="id=1",
    )
    deliver(dialogue, message_file(tmp_path), envelope, size=1234)
    assert dialogue.sent() == (
        b"MAIL FROM:<a@example.org> SIZE=1234 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+3D1\r\n"
        b"RCPT TO:<b@example.net> NOTIFY=DELAY,FAILURE ORCPT=rfc822;B+2Bx@example.net\r\n"
        b"DATA\r\n"
    )


def test_no_dsn_or_8bitmime_parameters_when_not_offered(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open(b"250-mx.test\r\n250 PIPELINING\r\n")
    envelope = Envelope(
        "a@example.org",
        (Recipient("b@example.net", frozenset({Notify.NEVER})),),
        body=Body.EIGHT_BIT,
        ret=Ret.FULL,
    )
    deliver(dialogue, message_file(tmp_path), envelope)
    assert dialogue.sent() == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def test_smtputf8_needed_but_not_offered_is_permanent_5_6_7(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open(b"250-mx.test\r\n250 PIPELINING\r\n")
    envelope = Envelope("ä@example.org", (Recipient("b@example.net"),), smtputf8=True)
    (outcome,) = result_of(deliver(dialogue, message_file(tmp_path), envelope))
    assert (outcome.result.code, outcome.result.enhanced) == (550, "5.6.7")
    assert dialogue.sent() == b""


def test_message_bigger_than_the_servers_size_limit(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    outcomes = result_of(deliver(dialogue, message_file(tmp_path), size=20000))
    assert [(o.result.code, o.result.enhanced) for o in outcomes] == [(552, "5.3.4")] * 2
    assert dialogue.sent() == b""


def test_null_sender(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open(b"250 mx.test\r\n")
    deliver(dialogue, message_file(tmp_path), Envelope("", (Recipient("b@example.net"),)))
    assert dialogue.sent() == b"MAIL FROM:<>\r\n"


def test_unsafe_recipient_address_is_never_sent(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    envelope = Envelope("a@example.org", (Recipient("b@example.net>\r\nRSET"), Recipient("c@example.net")))
    delivered = deliver(dialogue, message_file(tmp_path), envelope)
    sent = dialogue.sent()
    assert b"RSET" not in sent
    dialogue.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
    dialogue.server(b"250 ok\r\n")
    bad, good = result_of(delivered)
    assert bad.result.code == 553
    assert good.result.delivered


def test_timeout_while_waiting_for_rcpt(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open(b"250 mx.test\r\n")
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.server(b"250 ok\r\n")
    dialogue.clock.advance(300)
    error = failure_of(delivered)
    assert isinstance(error, SessionFailure)
    assert error.text == f"conversation with {PEER} timed out while receiving the RCPT TO response"
    assert error.failover


def test_timeout_waiting_for_end_of_data_is_not_failed_over(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    dialogue.clock.advance(599)
    assert not delivered.called
    dialogue.clock.advance(1)
    outcomes = result_of(delivered)
    assert [o.result.code for o in outcomes] == [451, 451]
    assert not any(o.failover for o in outcomes)  # the message may have been taken
    assert "timed out while receiving the end of data response" in outcomes[0].result.text


def test_connection_lost_during_the_body(tmp_path: Path) -> None:
    dialogue = Dialogue(settings=ClientSettings("gw.test", chunk_size=4))
    dialogue.transport.producer = None

    class PausingTransport(TlsStringTransport):
        def write(self, data: bytes) -> None:
            super().write(data)  # type: ignore[no-untyped-call]
            if self.producer is not None:
                self.producer.pauseProducing()

    transport = PausingTransport()
    dialogue.transport = transport
    dialogue.protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert dialogue.protocol.sender is not None
    dialogue.lose()
    error = failure_of(delivered)
    assert isinstance(error, SessionFailure)
    assert error.text == f"lost connection with {PEER} while sending message body"
    assert error.failover  # without the final dot nothing was delivered: another host may try


def test_lmtp_one_reply_per_accepted_recipient(tmp_path: Path) -> None:
    dialogue = Dialogue(lmtp=True)
    dialogue.open(b"250-lmtp.test\r\n250 PIPELINING\r\n")
    envelope = Envelope("a@example.org", (Recipient("b@x"), Recipient("c@x"), Recipient("d@x")))
    delivered = deliver(dialogue, message_file(tmp_path), envelope)
    dialogue.server(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
    dialogue.server(b"250 2.0.0 b delivered\r\n")
    assert not delivered.called
    dialogue.server(b"452 4.2.2 d over quota\r\n")
    b, c, d = result_of(delivered)
    assert b.result.delivered and "b delivered" in b.result.text
    assert c.result.code == 550
    assert (d.result.code, d.result.enhanced) == (452, "4.2.2")


def test_lmtp_uses_lhlo() -> None:
    dialogue = Dialogue(lmtp=True)
    ensureDeferred(dialogue.session.open(TlsPolicy.NONE))
    dialogue.server(b"220 lmtp.test\r\n")
    assert dialogue.sent() == b"LHLO gw.test\r\n"


# -- after a transaction -----------------------------------------------------------------


def test_reset_and_reuse(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    for _ in range(2):
        delivered = deliver(dialogue, message_file(tmp_path))
        dialogue.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
        assert all(o.result.delivered for o in result_of(delivered))
        dialogue.sent()
        reset = ensureDeferred(dialogue.session.reset())
        assert dialogue.sent() == b"RSET\r\n"
        dialogue.server(b"250 2.0.0 ok\r\n")
        assert result_of(reset) is True
    assert dialogue.session.transactions == 2


def test_reset_refused_closes() -> None:
    dialogue = Dialogue()
    dialogue.open()
    reset = ensureDeferred(dialogue.session.reset())
    dialogue.sent()
    dialogue.server(b"421 closing\r\n")
    assert result_of(reset) is False
    assert dialogue.sent() == b"QUIT\r\n"


def test_parked_session_sends_rset_with_the_next_mail(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
    assert all(o.result.delivered for o in result_of(delivered))
    dialogue.sent()
    assert dialogue.session.park()
    assert dialogue.sent() == b""  # nothing until the next transaction
    delivered = deliver(dialogue, message_file(tmp_path))
    assert dialogue.sent().startswith(b"RSET\r\nMAIL FROM:<a@example.org> SIZE=100")
    dialogue.server(b"250 reset\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert dialogue.sent().endswith(b"\r\n.\r\n")
    dialogue.server(b"250 queued\r\n")
    assert all(o.result.delivered for o in result_of(delivered))
    assert not dialogue.session.rset_pending


def test_parked_session_without_pipelining_waits_for_the_rset(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open(b"250-mx.test\r\n250 SIZE 10000\r\n")
    dialogue.session.park()
    delivered = deliver(dialogue, message_file(tmp_path))
    assert dialogue.sent() == b"RSET\r\n"
    dialogue.server(b"250 reset\r\n")
    assert dialogue.sent().startswith(b"MAIL FROM:")
    assert not delivered.called


def test_parked_session_refusing_rset_fails_without_sending(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    dialogue.session.park()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.sent()
    dialogue.server(b"503 no\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    error = failure_of(delivered)
    assert isinstance(error, SessionFailure)
    assert error.failover
    assert "(in reply to RSET command)" in error.text
    assert dialogue.transport.aborted
    assert dialogue.sent() == b""  # no body, no final dot: nothing delivered


def test_parked_session_lost_before_the_rset_reply(tmp_path: Path) -> None:
    dialogue = Dialogue()
    dialogue.open()
    dialogue.session.park()
    delivered = deliver(dialogue, message_file(tmp_path))
    dialogue.lose()
    error = failure_of(delivered)
    assert isinstance(error, SessionFailure)
    assert error.text == f"lost connection with {PEER} while receiving the RSET response"


def test_quit_closes_after_the_reply() -> None:
    dialogue = Dialogue()
    dialogue.open()
    dialogue.session.quit()
    assert dialogue.sent() == b"QUIT\r\n"
    assert not dialogue.transport.disconnecting
    dialogue.server(b"221 bye\r\n")
    assert dialogue.transport.disconnecting


def test_unsolicited_reply_aborts() -> None:
    dialogue = Dialogue()
    dialogue.open()
    dialogue.server(b"421 4.4.2 idle timeout\r\n")
    assert dialogue.transport.aborted


def test_client_error_text() -> None:
    error = ClientError("x")
    assert (error.text, error.enhanced, error.tls_failed) == ("x", "4.4.2", False)


@pytest.mark.parametrize(
    ("line", "code", "enhanced", "text"),
    [
        (b"250 2.1.0 Ok", 250, "2.1.0", "Ok"),
        (b"550 5.1.1", 550, "5.1.1", ""),
        (b"250 4.1.0 mismatched class", 250, None, "4.1.0 mismatched class"),
        (b"220", 220, None, ""),
    ],
)
def test_reply_parsing(line: bytes, code: int, enhanced: str | None, text: str) -> None:
    from gateway.smtp._client_protocol import parse_reply

    reply = parse_reply([line])
    assert (reply.code, reply.enhanced, reply.text) == (code, enhanced, text)
