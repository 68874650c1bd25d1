"""The SMTP server protocol, driven over a StringTransport with a task.Clock.

`Dialogue` (also used by the other test_smtp_server_* modules) is one client
connection: `ask("EHLO x")` sends a line and returns the reply lines.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.interfaces import IReception
from gateway.model import Recipient, Role, Session
from gateway.smtp.reply import Reply
from gateway.smtp.server import ServerSettings, SmtpServerFactory, SmtpServerProtocol
from gateway.testing import RecordingReception

SETTINGS = ServerSettings(hostname="mx.test", auth_failure_delay=0.0, error_delay=0.0)
BODY = b"Subject: hi\r\n\r\nhello\r\n"


@implementer(ITLSTransport)
class TlsCapableTransport(StringTransport):  # type: ignore[misc]  # only startTLS is used
    """A StringTransport that records startTLS (the handshake itself is not simulated)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.tls_context: object = None

    def startTLS(self, contextFactory: object, beNormal: bool = True) -> None:
        self.tls_context = contextFactory


class Dialogue:
    """One client connection to a fresh server."""

    def __init__(
        self,
        settings: ServerSettings = SETTINGS,
        *,
        reception: RecordingReception | None = None,
        tls_context: Any = None,
        credentials: Any = None,
        relay_networks: tuple[Any, ...] = (),
        peer: str = "192.0.2.1",
        role: Role = Role.INBOUND,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.reception = reception if reception is not None else RecordingReception()
        self.factory = SmtpServerFactory(
            settings,
            self.reception,
            clock=self.clock,
            tls_context=tls_context,
            credentials=credentials,
            relay_networks=relay_networks,
            listener="tcp:25",
            role=role,
        )
        self.protocol: SmtpServerProtocol = self.factory.buildProtocol(None)
        self.transport = TlsCapableTransport(peerAddress=IPv4Address("TCP", peer, 5555))
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.greeting = self.take()

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> list[str]:
        """The reply lines written since the last take."""
        text: str = self.transport.value().decode("utf-8")  # type: ignore[no-untyped-call]
        self.transport.clear()  # type: ignore[no-untyped-call]
        return text.split("\r\n")[:-1]

    def ask(self, line: str | bytes) -> list[str]:
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.take()

    def codes(self) -> list[str]:
        """The final lines of the replies since the last take (one per reply)."""
        return [line for line in self.take() if len(line) < 4 or line[3] != "-"]

    def ehlo(self, name: str = "client.example") -> list[str]:
        return self.ask(f"EHLO {name}")

    def transaction(self, sender: str = "a@example.org", *recipients: str) -> None:
        self.ehlo()
        assert self.ask(f"MAIL FROM:<{sender}>")[0].startswith("250 ")
        for recipient in recipients or ("b@example.com",):
            assert self.ask(f"RCPT TO:<{recipient}>")[0].startswith("250 ")

    def send_message(self, body: bytes = BODY) -> list[str]:
        assert self.ask("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
        self.send(body + b".\r\n")
        return self.take()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def stored(self, index: int = -1) -> bytes:
        """The message bytes written to the spool, without our Received header."""
        message = self.reception.messages[index]
        assert message.chunks[0].startswith(b"Received: ")  # written first, alone
        return b"".join(message.chunks[1:])


def test_recording_reception_provides_ireception() -> None:
    assert verifyObject(IReception, RecordingReception())


def test_greeting_names_host_and_banner() -> None:
    assert Dialogue().greeting == ["220 mx.test ESMTP MailGate"]


def test_ehlo_advertises_extensions_without_starttls_or_auth_when_not_configured() -> None:
    lines = Dialogue().ehlo()
    assert lines == [
        "250-mx.test",
        "250-PIPELINING",
        f"250-SIZE {100 * 1024 * 1024}",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250-CHUNKING",
        "250-BINARYMIME",
        "250 DSN",
    ]


def test_ehlo_advertises_starttls_when_a_context_is_given() -> None:
    assert "250 STARTTLS" in Dialogue(tls_context=object()).ehlo()


def test_ehlo_and_helo_need_an_argument() -> None:
    dialogue = Dialogue()
    assert dialogue.ask("EHLO") == ["501 5.5.4 Syntax: EHLO hostname"]
    assert dialogue.ask("HELO ") == ["501 5.5.4 Syntax: HELO hostname"]


def test_helo_is_plain_smtp_and_refuses_esmtp_parameters() -> None:
    dialogue = Dialogue()
    assert dialogue.ask("HELO client.example") == ["250 mx.test"]
    assert dialogue.ask("MAIL FROM:<a@example.org> SIZE=10") == ["555 5.5.4 MAIL parameters need EHLO"]
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]
    assert dialogue.ask("RCPT TO:<b@example.com>") == ["250 2.1.5 Ok"]
    assert dialogue.send_message() == ["250 2.0.0 Ok: queued as " + dialogue.reception.messages[0].queue_id]
    assert b"with SMTP id" in dialogue.reception.messages[0].data


def test_a_whole_transaction_is_stored_with_our_received_header_first() -> None:
    dialogue = Dialogue()
    dialogue.transaction("a@example.org", "b@example.com")
    reply = dialogue.send_message(b"Subject: hi\r\n\r\n..dot\r\nline\r\n")
    message = dialogue.reception.messages[0]
    assert reply == [f"250 2.0.0 Ok: queued as {message.queue_id}"]
    assert message.committed and not message.aborted
    assert message.data == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.test with ESMTP id " + message.queue_id.encode() + b"\r\n"
        b"\tfor <b@example.com>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"Subject: hi\r\n\r\n.dot\r\nline\r\n"
    )
    envelope, _ = dialogue.reception.accepted[0]
    assert envelope.mail_from == "a@example.org"
    assert envelope.rcpt_to == (Recipient("b@example.com"),)


def test_received_header_omits_for_with_several_recipients() -> None:
    dialogue = Dialogue()
    dialogue.transaction("a@example.org", "b@example.com", "c@example.com")
    dialogue.send_message()
    header = dialogue.reception.messages[0].data.split(b"\r\nSubject")[0]
    assert b"for <" not in header
    assert header.endswith(b"; Tue, 14 Nov 2023 22:13:20 +0000")


def test_received_header_sanitizes_the_helo_name() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    dialogue.ask("RSET")
    dialogue.ask("EHLO evil(x)<y>;z")
    dialogue.ask("MAIL FROM:<a@example.org>")
    dialogue.ask("RCPT TO:<b@example.com>")
    dialogue.send_message()
    assert dialogue.reception.messages[0].data.startswith(b"Received: from evil_x__y__z ([192.0.2.1])")


def test_empty_message_and_dot_only_lines() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    assert dialogue.send_message(b"")[0].startswith("250 2.0.0")
    assert dialogue.stored() == b""
    dialogue.transaction()
    assert dialogue.send_message(b"..\r\n...\r\n.x\r\n")[0].startswith("250 2.0.0")
    assert dialogue.stored() == b".\r\n..\r\nx\r\n"


def test_sequence_errors() -> None:
    dialogue = Dialogue()
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["503 5.5.1 Error: send HELO/EHLO first"]
    dialogue.ehlo()
    assert dialogue.ask("RCPT TO:<b@example.com>") == ["503 5.5.1 Error: need MAIL command"]
    assert dialogue.ask("DATA") == ["503 5.5.1 Error: need MAIL command"]
    dialogue.ask("MAIL FROM:<a@example.org>")
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["503 5.5.1 Error: nested MAIL command"]
    assert dialogue.ask("DATA") == ["554 5.5.1 Error: no valid recipients"]
    dialogue.ask("RCPT TO:<b@example.com>")
    assert dialogue.ask("DATA now") == ["501 5.5.4 Syntax: DATA"]
    assert dialogue.ask("MAIL TO:<a@example.org>") == ["503 5.5.1 Error: nested MAIL command"]
    assert dialogue.ask("RCPT FROM:<a@example.org>") == ["501 5.5.2 Syntax: RCPT TO:<address>"]


def test_simple_commands() -> None:
    dialogue = Dialogue()
    assert dialogue.ask("NOOP") == ["250 2.0.0 Ok"]
    assert dialogue.ask("noop with argument") == ["250 2.0.0 Ok"]
    assert dialogue.ask("HELP")[0].startswith("214 2.0.0 Commands: EHLO")
    assert dialogue.ask("VRFY") == ["501 5.5.4 Syntax: VRFY address"]
    assert dialogue.ask("VRFY root") == ["502 5.5.1 VRFY command is disabled"]
    assert dialogue.ask("EXPN staff") == ["502 5.5.1 EXPN command is disabled"]
    assert dialogue.ask("FROB") == ["500 5.5.2 Error: command not recognized"]
    assert dialogue.ask("RSET x") == ["501 5.5.4 Syntax: RSET"]
    assert dialogue.ask("STARTTLS") == ["502 5.5.1 Error: command not implemented"]
    assert dialogue.ask("AUTH PLAIN") == ["502 5.5.1 Error: authentication not enabled"]
    assert not dialogue.closed
    assert dialogue.ask("QUIT") == ["221 2.0.0 Bye"]
    assert dialogue.closed


def test_vrfy_when_enabled_answers_252() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, vrfy_enabled=True))
    assert dialogue.ask("VRFY root") == [
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    ]


def test_nothing_is_read_after_quit() -> None:
    dialogue = Dialogue()
    dialogue.send(b"QUIT\r\nNOOP\r\n")
    assert dialogue.take() == ["221 2.0.0 Bye"]
    dialogue.send(b"NOOP\r\n")
    assert dialogue.take() == []


def test_rset_forgets_the_transaction() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    assert dialogue.ask("RSET") == ["250 2.0.0 Ok"]
    assert dialogue.ask("DATA") == ["503 5.5.1 Error: need MAIL command"]
    assert dialogue.ask("MAIL FROM:<>") == ["250 2.1.0 Ok"]


def test_reception_refusals_are_passed_on_and_refused_recipients_left_out() -> None:
    reception = RecordingReception()
    reception.refuse_mail["spammer@example.net"] = Reply(550, "5.7.1", "Go away")
    reception.refuse_rcpt["nobody@example.com"] = Reply(550, "5.1.1", "No such user")
    dialogue = Dialogue(reception=reception)
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<spammer@example.net>") == ["550 5.7.1 Go away"]
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]
    assert dialogue.ask("RCPT TO:<nobody@example.com>") == ["550 5.1.1 No such user"]
    assert dialogue.ask("RCPT TO:<b@example.com>") == ["250 2.1.5 Ok"]
    dialogue.send_message()
    envelope, _ = reception.accepted[0]
    assert [r.address for r in envelope.rcpt_to] == ["b@example.com"]


def test_end_of_data_refusal_is_passed_on() -> None:
    reception = RecordingReception()
    reception.accept_result = Reply(554, "5.7.1", "Virus found")
    dialogue = Dialogue(reception=reception)
    dialogue.transaction()
    assert dialogue.send_message() == ["554 5.7.1 Virus found"]
    assert reception.messages[0].aborted
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]


def test_temporary_failure_is_4xx() -> None:
    """Regression (twisted.mail answers 550 when end-of-data fails, even for a 451)."""
    reception = RecordingReception()
    reception.accept_result = OSError("disk full")
    dialogue = Dialogue(reception=reception)
    dialogue.transaction()
    with capturedLogs() as events:
        assert dialogue.send_message() == ["451 4.3.0 Temporary failure, please try again later"]
    assert any("accept failed" in str(event.get("log_format")) for event in events)
    reception.accept_result = Reply(451, "4.3.0", "Spool busy")
    dialogue.transaction()
    assert dialogue.send_message() == ["451 4.3.0 Spool busy"]


def test_failing_checks_are_4xx() -> None:
    class Broken(RecordingReception):
        def check_mail(self, session: Session, envelope: Any) -> Deferred[Reply | None]:
            return fail(RuntimeError("filter crashed"))

        def check_rcpt(self, session: Session, envelope: Any, recipient: Any) -> Deferred[Reply | None]:
            raise RuntimeError("not even a Deferred")

    dialogue = Dialogue(reception=Broken())
    dialogue.ehlo()
    with capturedLogs():
        assert dialogue.ask("MAIL FROM:<a@example.org>")[0].startswith("451 4.3.0")
        broken_mail = Broken.check_mail
        del Broken.check_mail
        assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]
        Broken.check_mail = broken_mail  # type: ignore[method-assign]
        assert dialogue.ask("RCPT TO:<b@example.com>")[0].startswith("451 4.3.0")


def test_new_message_failure_is_4xx() -> None:
    class NoSpool(RecordingReception):
        def new_message(self, session: Session) -> Any:
            raise OSError("spool directory missing")

    dialogue = Dialogue(reception=NoSpool())
    dialogue.transaction()
    with capturedLogs():
        assert dialogue.ask("DATA") == ["451 4.3.0 Temporary failure, please try again later"]
    assert dialogue.ask("NOOP") == ["250 2.0.0 Ok"]


def test_a_421_from_the_reception_closes_the_connection() -> None:
    reception = RecordingReception()
    reception.refuse_mail["a@example.org"] = Reply(421, "4.7.0", "mx.test too busy")
    dialogue = Dialogue(reception=reception)
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["421 4.7.0 mx.test too busy"]
    assert dialogue.closed


# --- pipelining -------------------------------------------------------------------------


PIPELINED = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<a@example.org>\r\n"
    b"RCPT TO:<b@example.com>\r\n"
    b"RCPT TO:<nobody@example.com>\r\n"
    b"RCPT TO:<c@example.com>\r\n"
    b"DATA\r\n"
)


def test_pipelined_batch_with_late_checks_is_answered_in_order() -> None:
    reception = RecordingReception(hold=True)
    reception.refuse_rcpt["nobody@example.com"] = Reply(550, "5.1.1", "No such user")
    dialogue = Dialogue(reception=reception)
    dialogue.send(PIPELINED + BODY + b".\r\nQUIT\r\n")
    assert dialogue.codes() == ["250 DSN"]  # EHLO answered, then waiting for check_mail
    assert reception.calls == [("mail", "a@example.org")]
    reception.release(1)
    assert dialogue.codes() == ["250 2.1.0 Ok"]
    assert reception.calls[-1] == ("rcpt", "b@example.com")
    reception.release(1)
    reception.release(1)
    assert dialogue.codes() == ["250 2.1.5 Ok", "550 5.1.1 No such user"]
    reception.release(1)
    queue_id = reception.messages[0].queue_id
    assert dialogue.codes() == ["250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert reception.calls[-1] == ("accept", queue_id)
    assert not dialogue.closed  # QUIT waits for the answer to the message
    reception.release(1)
    assert dialogue.codes() == [f"250 2.0.0 Ok: queued as {queue_id}", "221 2.0.0 Bye"]
    assert dialogue.closed
    assert reception.pending == []
    assert [call for call in reception.calls if call[0] == "rcpt"] == [
        ("rcpt", "b@example.com"),
        ("rcpt", "nobody@example.com"),
        ("rcpt", "c@example.com"),
    ]
    envelope, _message = reception.accepted[0]
    assert [r.address for r in envelope.rcpt_to] == ["b@example.com", "c@example.com"]
    assert dialogue.stored() == BODY


def test_pipelined_batch_with_immediate_checks_and_two_messages() -> None:
    dialogue = Dialogue()
    batch = PIPELINED + BODY + b".\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n"
    dialogue.send(batch + b"second\r\n.\r\nQUIT\r\n")
    codes = [line[:3] for line in dialogue.codes()]
    assert codes == ["250", "250", "250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]
    assert [m.committed for m in dialogue.reception.messages] == [True, True]
    assert dialogue.stored(1) == b"second\r\n"


def test_transaction_fed_one_byte_at_a_time() -> None:
    dialogue = Dialogue()
    stream = PIPELINED + b"Subject: x\r\n\r\n..a\r\n\r\n.\r\nQUIT\r\n"
    for index in range(len(stream)):
        dialogue.send(stream[index : index + 1])
    assert [line[:3] for line in dialogue.codes()] == ["250"] * 5 + ["354", "250", "221"]
    assert dialogue.stored() == b"Subject: x\r\n\r\n.a\r\n\r\n"


def test_reading_pauses_while_the_client_floods_a_pending_check() -> None:
    reception = RecordingReception(hold=True)
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_commands=100_000), reception=reception)
    dialogue.ehlo()
    dialogue.send(b"MAIL FROM:<a@example.org>\r\n" + b"NOOP\r\n" * 20000)
    assert dialogue.transport.producerState == "paused"
    assert dialogue.take() == []
    reception.release(1)
    assert dialogue.transport.producerState == "producing"
    assert dialogue.codes() == ["250 2.1.0 Ok"] + ["250 2.0.0 Ok"] * 20000
