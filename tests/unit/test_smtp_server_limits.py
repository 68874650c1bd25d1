"""SMTP server: envelope parameters, SMTPUTF8, BDAT, limits, timeouts, logging, sessions."""

from __future__ import annotations

import ipaddress

import attrs
from twisted.logger import capturedLogs

from gateway.model import Body, Notify, Recipient, Ret, Role
from gateway.testing import RecordingReception
from tests.unit.test_smtp_server import BODY, SETTINGS, Dialogue

# --- envelope parameters -------------------------------------------------------------


def test_dsn_parameters_are_kept_in_the_envelope() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B314 SIZE=1000 BODY=8BITMIME") == [
        "250 2.1.0 Ok"
    ]
    assert dialogue.ask("RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.com") == [
        "250 2.1.5 Ok"
    ]
    assert dialogue.ask("RCPT TO:<c@example.com> NOTIFY=NEVER") == ["250 2.1.5 Ok"]
    dialogue.send_message()
    envelope, _ = dialogue.reception.accepted[0]
    assert envelope.ret is Ret.HDRS
    assert envelope.envid == "QQ+314"
    assert envelope.size == 1000
    assert envelope.body is Body.EIGHT_BIT
    assert envelope.rcpt_to == (
        Recipient("b@example.com", frozenset({Notify.SUCCESS, Notify.FAILURE}), "rfc822;b@example.com"),
        Recipient("c@example.com", frozenset({Notify.NEVER})),
    )


def test_auth_parameter_is_stored() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org> AUTH=<>")
    dialogue.ask("RCPT TO:<b@example.com>")
    dialogue.send_message()
    assert dialogue.reception.accepted[0][0].auth == "<>"


def test_bad_and_unknown_parameters() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org> FROB=1") == ["555 5.5.4 Unsupported MAIL parameter: FROB"]
    assert dialogue.ask("MAIL FROM:<a@example.org> BODY=9BIT")[0].startswith("501 5.5.4")
    assert dialogue.ask("MAIL FROM:<a@example.org> SIZE=big")[0].startswith("501 5.5.4")
    assert dialogue.ask("MAIL FROM:a@example.org")[0].startswith("501 5.5.2")
    assert dialogue.ask("MAIL FROM:<a@@example.org>") == ["501 5.1.7 Bad sender address syntax"]
    dialogue.ask("MAIL FROM:<a@example.org>")
    assert dialogue.ask("RCPT TO:<b@example.com> FROB") == ["555 5.5.4 Unsupported RCPT parameter: FROB"]
    assert dialogue.ask("RCPT TO:<b@example.com> NOTIFY=NEVER,DELAY")[0].startswith("501 5.5.4")
    assert dialogue.ask("RCPT TO:<b example.com>") == ["501 5.1.3 Bad recipient address syntax"]
    assert dialogue.ask("RCPT TO:<Postmaster>") == ["250 2.1.5 Ok"]


def test_declared_size_over_the_limit_is_refused_at_mail() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_message_size=1000))
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.org> SIZE=1001") == [
        "552 5.3.4 Message size exceeds fixed limit"
    ]
    assert dialogue.ask("MAIL FROM:<a@example.org> SIZE=1000") == ["250 2.1.0 Ok"]


def test_smtputf8_addresses_need_the_parameter() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<jörg@exämple.org>") == [
        "553 5.6.7 Non-ASCII sender address needs SMTPUTF8"
    ]
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]
    assert dialogue.ask("RCPT TO:<用户@例子.广告>") == [
        "553 5.6.7 Non-ASCII recipient address needs SMTPUTF8"
    ]
    dialogue.ask("RSET")
    assert dialogue.ask("MAIL FROM:<jörg@exämple.org> SMTPUTF8") == ["250 2.1.0 Ok"]
    assert dialogue.ask("RCPT TO:<用户@例子.广告>") == ["250 2.1.5 Ok"]
    dialogue.send_message("Subject: grüße\r\n\r\n✓\r\n".encode())
    envelope, message = dialogue.reception.accepted[0]
    assert envelope.smtputf8 and envelope.mail_from == "jörg@exämple.org"
    assert envelope.rcpt_to[0].address == "用户@例子.广告"
    assert b" with UTF8SMTP id " in message.data
    assert "for <用户@例子.广告>".encode() in message.data


def test_invalid_utf8_in_a_command_is_a_syntax_error() -> None:
    dialogue = Dialogue()
    assert dialogue.ask(b"EHLO \xff\xfe") == ["500 5.5.2 Error: invalid characters in command"]
    assert dialogue.ask("MÄIL FROM:<a@example.org>") == ["500 5.5.2 Error: command not recognized"]


# --- limits ------------------------------------------------------------------------------


def test_too_many_recipients() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_recipients=2))
    dialogue.transaction("a@example.org", "b@example.com", "c@example.com")
    assert dialogue.ask("RCPT TO:<d@example.com>") == ["452 4.5.3 Error: too many recipients"]
    dialogue.send_message()
    assert len(dialogue.reception.accepted[0][0].rcpt_to) == 2


def test_message_over_the_size_limit_is_read_to_its_end_then_refused() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_message_size=10_000))
    dialogue.transaction()
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20 + b"RCPT TO:<smuggled@example.com>\r\n"
    assert dialogue.send_message(body) == ["552 5.3.4 Message size exceeds fixed limit"]
    message = dialogue.reception.messages[0]
    assert message.aborted and not message.committed
    assert message.size < 11_000  # stopped writing at the limit
    assert ("rcpt", "smuggled@example.com") not in dialogue.reception.calls
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]  # the session goes on


def test_hop_limit_counts_received_headers() -> None:
    settings = attrs.evolve(SETTINGS, max_hops=3)
    dialogue = Dialogue(settings)
    dialogue.transaction()
    header = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    assert dialogue.send_message(header * 3 + b"\r\nReceived: in the body\r\n")[0].startswith("250 ")
    dialogue.transaction()
    assert dialogue.send_message(header * 3 + b"received: x\r\n\r\nbody\r\n") == [
        "554 5.4.6 Too many hops: mail forwarding loop"
    ]
    assert dialogue.reception.messages[-1].aborted
    dialogue.transaction()
    # a message that is all header, without an empty line
    assert dialogue.send_message(header * 4)[0].startswith("554 5.4.6")


def test_long_data_lines_are_kept_whole() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    line = b"." + b"y" * 300_000 + b"\r\n"
    dialogue.ask("DATA")
    for offset in range(0, len(line), 7000):
        dialogue.send(line[offset : offset + 7000])
    dialogue.send(b".\r\n")
    assert dialogue.codes()[0].startswith("250 ")
    assert dialogue.stored() == line[1:]
    assert len(dialogue.protocol._buffer) == 0


def test_too_many_commands() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_commands=5))
    dialogue.send(b"NOOP\r\n" * 7)
    assert dialogue.codes() == ["250 2.0.0 Ok"] * 5 + ["421 4.7.0 mx.test Error: too many commands"]
    assert dialogue.closed


def test_too_many_errors() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_errors=3))
    dialogue.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert dialogue.codes() == ["500 5.5.2 Error: command not recognized"] * 3 + [
        "421 4.7.0 mx.test Error: too many errors"
    ]
    assert dialogue.closed


def test_forbidden_http_commands_close_the_connection() -> None:
    dialogue = Dialogue()
    dialogue.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert dialogue.codes() == ["421 4.7.0 mx.test Error: go away"]
    assert dialogue.closed


def test_idle_timeout() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    dialogue.clock.advance(299)
    dialogue.send(b"NO")  # any byte counts as activity
    dialogue.clock.advance(299)
    assert not dialogue.closed
    dialogue.clock.advance(2)
    assert dialogue.take() == ["421 4.4.2 mx.test Error: timeout exceeded"]
    assert dialogue.closed


def test_idle_timeout_during_data_aborts_the_message() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    dialogue.ask("DATA")
    dialogue.send(b"Subject: x\r\n")
    dialogue.clock.advance(300)
    assert dialogue.take() == ["421 4.4.2 mx.test Error: timeout exceeded"]
    dialogue.protocol.connectionLost()
    assert dialogue.reception.messages[0].aborted


def test_no_timeout_while_the_reception_is_thinking() -> None:
    reception = RecordingReception(hold=True)
    dialogue = Dialogue(reception=reception)
    dialogue.ehlo()
    dialogue.send(b"MAIL FROM:<a@example.org>\r\n")
    dialogue.clock.advance(1000)
    assert not dialogue.closed
    reception.release()
    assert dialogue.take() == ["250 2.1.0 Ok"]
    dialogue.clock.advance(300)
    assert dialogue.closed


def test_disconnect_mid_data_aborts_the_message() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    dialogue.ask("DATA")
    dialogue.send(b"Subject: half\r\n")
    with capturedLogs() as events:
        dialogue.protocol.connectionLost()
    message = dialogue.reception.messages[0]
    assert message.aborted and not message.committed
    lines = [str(event["log_format"]).format(**event) for event in events]
    assert lines == [
        f"smtpd: {message.queue_id}: lost connection with [192.0.2.1]:5555 during DATA",
        "smtpd: disconnect from [192.0.2.1]:5555 commands=4 messages=0 rcpt=1 errors=0",
    ]


# --- BDAT ----------------------------------------------------------------------------------


def test_bdat_chunks_split_across_reads() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    first, second = b"Subject: chunked\r", b"\n\r\nbody\r\n.\r\n"
    dialogue.send(b"BDAT %d\r\n" % len(first) + first[:5])
    assert dialogue.take() == []
    dialogue.send(first[5:] + b"BDAT %d LAST\r\n" % len(second) + second[:3])
    assert dialogue.take() == [f"250 2.0.0 {len(first)} octets received"]
    dialogue.send(second[3:] + b"NOOP\r\n")
    message = dialogue.reception.messages[0]
    assert dialogue.codes() == [f"250 2.0.0 Ok: queued as {message.queue_id}", "250 2.0.0 Ok"]
    assert dialogue.stored() == first + second  # no dot handling in BDAT


def test_bdat_zero_last_and_pipelined_chunks() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    dialogue.send(
        b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<b@example.com>\r\n"
        b"BDAT 4\r\n\x00\n\r.BDAT 0 LAST\r\nQUIT\r\n"
    )
    assert [line[:3] for line in dialogue.codes()] == ["250", "250", "250", "250", "221"]
    assert dialogue.stored() == b"\x00\n\r."  # binary: bare LF/CR kept
    assert dialogue.reception.accepted[0][0].body is Body.BINARY


def test_binarymime_needs_bdat() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org> BODY=BINARYMIME")
    dialogue.ask("RCPT TO:<b@example.com>")
    assert dialogue.ask("DATA") == ["503 5.5.1 Error: BODY=BINARYMIME needs BDAT"]


def test_bdat_without_transaction_reads_and_discards_the_chunk() -> None:
    dialogue = Dialogue()
    dialogue.ehlo()
    dialogue.send(b"BDAT 25 LAST\r\nRCPT TO:<x@example.com>\r\nNOOP\r\n")
    assert dialogue.codes() == ["503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok"]
    assert dialogue.reception.calls == []


def test_data_after_bdat_is_refused() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    dialogue.send(b"BDAT 3\r\nabc")
    assert dialogue.codes() == ["250 2.0.0 3 octets received"]
    assert dialogue.ask("DATA") == ["503 5.5.1 Error: DATA inside a BDAT transfer"]
    dialogue.send(b"BDAT 2 LAST\r\nd\n")  # not BINARYMIME: bare LF refused
    assert dialogue.codes() == ["550 5.5.2 Error: bare CR or LF in message data"]
    assert dialogue.reception.messages[0].aborted
    dialogue.send(b"BDAT 1 LAST\r\nx")
    assert dialogue.codes() == ["503 5.5.1 Error: need MAIL command"]


def test_bdat_over_the_size_limit() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_message_size=100))
    dialogue.transaction()
    dialogue.send(b"BDAT 60\r\n" + b"a" * 60 + b"BDAT 60 LAST\r\n" + b"b" * 60 + b"NOOP\r\n")
    assert dialogue.codes() == [
        "250 2.0.0 60 octets received",
        "552 5.3.4 Message size exceeds fixed limit",
        "250 2.0.0 Ok",
    ]
    assert dialogue.reception.messages[0].aborted


def test_bdat_bad_syntax_closes_the_connection() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    assert dialogue.ask("BDAT ten") == ["501 5.5.4 Syntax: BDAT size [LAST]; closing"]
    assert dialogue.closed


def test_bdat_chunks_do_not_count_as_commands() -> None:
    dialogue = Dialogue(attrs.evolve(SETTINGS, max_commands=10))
    dialogue.transaction()
    dialogue.send(b"BDAT 1\r\nx" * 20 + b"BDAT 2 LAST\r\n\r\n")
    assert dialogue.codes()[-1].startswith("250 2.0.0 Ok: queued")


# --- sessions and logs ---------------------------------------------------------------------


def test_relay_networks_role_and_listener_reach_the_reception() -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"),)
    inside = Dialogue(relay_networks=networks, peer="10.1.2.3", role=Role.SUBMISSION)
    inside.transaction()
    session = inside.reception.sessions[0]
    assert session.may_relay and session.role is Role.SUBMISSION and session.listener == "tcp:25"
    assert (session.peer_host, session.peer_port, session.helo) == ("10.1.2.3", 5555, "client.example")
    outside = Dialogue(relay_networks=networks)
    outside.transaction()
    assert not outside.reception.sessions[0].may_relay


def test_log_lines_for_connect_reject_and_disconnect() -> None:
    with capturedLogs() as events:
        dialogue = Dialogue()
        dialogue.transaction()
        dialogue.ask("DATA")
        dialogue.send(b"a\nb\r\n.\r\n")
        dialogue.ask("QUIT")
        dialogue.protocol.connectionLost()
    queue_id = dialogue.reception.messages[0].queue_id
    lines = [str(event["log_format"]).format(**event) for event in events]
    assert lines == [
        "smtpd: connect from [192.0.2.1]:5555",
        f"smtpd: {queue_id}: reject DATA from [192.0.2.1]:5555:"
        " 550 5.5.2 Error: bare CR or LF in message data",
        "smtpd: disconnect from [192.0.2.1]:5555 commands=5 messages=0 rcpt=1 errors=1",
    ]
    assert events[1]["queue_id"] == queue_id


def test_body_with_crlf_only_is_accepted_byte_for_byte() -> None:
    dialogue = Dialogue()
    dialogue.transaction()
    dialogue.send_message(BODY)
    assert dialogue.stored() == BODY


def test_factory_from_config() -> None:
    from twisted.internet.task import Clock

    from gateway import config
    from gateway.smtp.server import SmtpServerFactory

    cfg = config.load(None)
    factory = SmtpServerFactory.from_config(cfg, cfg.smtp.listeners[0], RecordingReception(), reactor=Clock())
    assert factory.settings.hostname == cfg.gateway.hostname
    assert factory.settings.max_recipients == cfg.smtp.max_recipients
    assert factory.listener == cfg.smtp.listeners[0].endpoint
    assert factory.relay_networks == cfg.relay.networks
