"""Each real peer on its own, driven by plain clients (smtplib, dnspython, swaks).

If these fail, an integration test of the gateway against the same peer proves nothing.
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import dns.name
import dns.resolver
import pytest

from .peers import (
    NsdServer,
    PostfixRelayWithAuth,
    PostfixSink,
    SmtpSink,
    free_port,
    require_program,
    wait_for_port,
)

pytestmark = pytest.mark.integration


def _message(message_id: str, to: str = "alice@internal.test", subject: str = "peer test") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@client.test"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = f"<{message_id}>"
    message.set_content("Hello from the peer tests.\n")
    return message


def _client_tls(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = True
    return context


# -- PostfixSink -------------------------------------------------------------------------------


def test_postfix_sink_delivers_each_recipient_and_finds_by_message_id(postfix_sink: PostfixSink) -> None:
    with smtplib.SMTP(*postfix_sink.address, timeout=10) as client:
        refused = client.send_message(
            _message("sink-1@client.test"),
            from_addr="sender@client.test",
            to_addrs=["alice@internal.test", "bob@internal.test"],
        )
    assert refused == {}

    copies = postfix_sink.wait_for_message_id("<sink-1@client.test>", count=2)

    assert sorted(copy.envelope_recipient for copy in copies) == ["alice@internal.test", "bob@internal.test"]
    assert {copy.envelope_sender for copy in copies} == {"sender@client.test"}
    assert {copy.mailbox for copy in copies} == {"internal.test"}
    assert copies[0].message["Subject"] == "peer test"
    assert "Hello from the peer tests." in copies[0].message.get_content()
    assert postfix_sink.find("nobody-sent-this@client.test") == []


def test_postfix_sink_refuses_other_domains_and_bad_local_parts(postfix_sink: PostfixSink) -> None:
    with smtplib.SMTP(*postfix_sink.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("sender@client.test")[0] == 250
        code, reply = client.rcpt("someone@elsewhere.test")
        assert (code, b"5.7.1" in reply, b"Relay access denied" in reply) == (554, True, True)
        code, reply = client.rcpt("bad/part@internal.test")
        assert (code, reply[:5]) == (550, b"5.1.1")


def test_postfix_sink_configured_rejects_and_deferrals(make_postfix_sink: Callable[..., PostfixSink]) -> None:
    sink = make_postfix_sink(reject_recipients=[r"^gone@"], defer_recipients=[r"^later@"])
    with smtplib.SMTP(*sink.address, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        assert client.rcpt("gone@internal.test")[0] == 550
        assert client.rcpt("later@internal.test")[0] == 450
        assert client.rcpt("here@internal.test")[0] == 250


def test_postfix_sink_offers_starttls_with_a_certificate_from_the_test_ca(postfix_sink: PostfixSink) -> None:
    with smtplib.SMTP(*postfix_sink.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=_client_tls(postfix_sink.ca_file))  # verifies 127.0.0.1 against the SAN
        client.send_message(_message("sink-tls@client.test"), to_addrs=["carol@internal.test"])
    (copy,) = postfix_sink.wait_for_message_id("sink-tls@client.test")
    assert "ESMTPS" in str(copy.message["Received"])


# -- PostfixRelayWithAuth ----------------------------------------------------------------------


def test_relay_with_starttls_and_auth_reaches_the_next_hop(
    postfix_relay: PostfixRelayWithAuth, postfix_sink: PostfixSink
) -> None:
    with smtplib.SMTP(*postfix_relay.address, timeout=10) as client:
        client.ehlo("gateway.test")
        assert not client.has_extn("auth"), "AUTH must only be offered after STARTTLS"
        client.starttls(context=_client_tls(postfix_relay.ca_file))
        client.ehlo("gateway.test")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        client.login(postfix_relay.user, postfix_relay.password)
        client.send_message(_message("relay-1@client.test", to="dave@internal.test"))

    (copy,) = postfix_sink.wait_for_message_id("relay-1@client.test")
    received = [str(value) for value in copy.message.get_all("Received", [])]
    assert any(f"Authenticated sender: {postfix_relay.user}" in value for value in received)
    assert any("by smarthost.upstream.test" in value and "ESMTPSA" in value for value in received)
    assert postfix_relay.queue_count() == 0


def test_relay_refuses_unauthenticated_relaying(postfix_relay: PostfixRelayWithAuth) -> None:
    with smtplib.SMTP(*postfix_relay.address, timeout=10) as client:
        client.starttls(context=_client_tls(postfix_relay.ca_file))
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.send_message(_message("relay-2@client.test", to="erin@internal.test"))
    code, reply = refused.value.recipients["erin@internal.test"]
    assert (code, reply[:5]) == (554, b"5.7.1")


def test_relay_rejects_a_wrong_password(postfix_relay: PostfixRelayWithAuth) -> None:
    with smtplib.SMTP(*postfix_relay.address, timeout=10) as client:
        client.starttls(context=_client_tls(postfix_relay.ca_file))
        client.ehlo("gateway.test")
        client.user, client.password = postfix_relay.user, postfix_relay.password + "-wrong"
        # One mechanism: login() would retry with LOGIN, and Postfix pauses after each error.
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth("PLAIN", client.auth_plain)
    assert failed.value.smtp_code == 535


# -- SmtpSink ----------------------------------------------------------------------------------


def test_smtp_sink_counts_and_dumps_transactions(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(*smtp_sink.address, timeout=10) as client:
        client.send_message(_message("dump-1@client.test"), to_addrs=["x@a.test", "y@b.test"])
        client.send_message(_message("dump-2@client.test"), to_addrs=["z@c.test"])

    assert smtp_sink.wait_for_messages(2) == 2
    (first,) = smtp_sink.find("dump-1@client.test")
    assert (first.mail_from, first.rcpt_to) == ("sender@client.test", ("x@a.test", "y@b.test"))
    assert first.message["Subject"] == "peer test"
    assert sorted(message.message_id for message in smtp_sink.messages()) == [
        "dump-1@client.test",
        "dump-2@client.test",
    ]


# -- swaks -------------------------------------------------------------------------------------


def test_swaks_delivers_to_the_smtp_sink(swaks: Callable[..., Any], smtp_sink: SmtpSink) -> None:
    code, transcript = swaks(
        "--to", "user@sink.test", "--from", "swaks@client.test", "--helo", "client.test",
        "--header", "Message-Id: <swaks-1@client.test>", "--pipeline",
        server=smtp_sink.address,
    )  # fmt: skip
    assert code == 0, transcript
    assert "PIPELINING" in transcript
    smtp_sink.wait_for_messages(1)
    (dumped,) = smtp_sink.find("swaks-1@client.test")
    assert dumped.rcpt_to == ("user@sink.test",)


def test_swaks_tls_and_auth_through_the_relay(
    swaks: Callable[..., Any], postfix_relay: PostfixRelayWithAuth, postfix_sink: PostfixSink
) -> None:
    code, transcript = swaks(
        "--to", "frank@internal.test", "--from", "swaks@client.test", "--helo", "client.test",
        "--tls", "--auth", "PLAIN",
        "--auth-user", postfix_relay.user, "--auth-password", postfix_relay.password,
        "--header", "Message-Id: <swaks-2@client.test>",
        server=postfix_relay.address,
    )  # fmt: skip
    assert code == 0, transcript
    postfix_sink.wait_for_message_id("swaks-2@client.test")

    code, transcript = swaks(
        "--to", "frank@internal.test", "--from", "swaks@client.test", "--helo", "client.test",
        server=postfix_relay.address,
    )  # fmt: skip
    assert code == 24, transcript  # no RCPT accepted
    assert "554 5.7.1" in transcript


# -- NsdServer ---------------------------------------------------------------------------------


def test_nsd_answers_mx_a_aaaa_and_null_mx(nsd_server: NsdServer) -> None:
    resolver = nsd_server.resolver()
    assert nsd_server.nameserver == f"127.0.0.1:{nsd_server.port}"

    mx = sorted(
        (record.preference, str(record.exchange)) for record in resolver.resolve("example.test.", "MX")
    )
    assert mx == [(10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert [record.address for record in resolver.resolve("mx1.example.test.", "A")] == ["127.0.0.1"]
    assert [record.address for record in resolver.resolve("mx1.example.test.", "AAAA")] == ["::1"]

    (null_mx,) = resolver.resolve("nullmx.example.test.", "MX")
    assert (null_mx.preference, null_mx.exchange) == (0, dns.name.root)

    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.example.test.", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("amx.example.test.", "MX")  # A only: the implicit-MX case


def test_nsd_serves_zones_given_as_text_over_udp_and_tcp(make_nsd: Callable[..., NsdServer]) -> None:
    server = make_nsd({"other.test": "@ IN MX 5 mail\nmail IN A 127.0.0.7\n"})
    resolver = server.resolver()
    (mx,) = resolver.resolve("other.test.", "MX", tcp=True)
    assert str(mx.exchange) == "mail.other.test."
    assert [record.address for record in resolver.resolve("mail.other.test.", "A")] == ["127.0.0.7"]
    with pytest.raises(dns.resolver.NoNameservers):  # REFUSED: not authoritative for it
        resolver.resolve("example.test.", "MX")


# -- the harness itself ------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a killed daemon waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stopped_peer_leaves_no_process_port_or_directory(
    make_postfix_sink: Callable[..., PostfixSink],
) -> None:
    sink = make_postfix_sink()
    pids = sink._instance_pids()
    assert pids and sink.master_pid() in pids

    sink.stop()

    assert sink._instance_pids() == []
    assert not any(_running(pid) for pid in pids)
    assert not os.path.exists(sink.directory)
    with pytest.raises(OSError), socket.create_connection(sink.address, timeout=1):
        pass


def test_two_postfix_instances_run_side_by_side(make_postfix_sink: Callable[..., PostfixSink]) -> None:
    first = make_postfix_sink(domains=["one.test"])
    second = make_postfix_sink(domains=["two.test"])
    assert first.port != second.port and first.queue != second.queue
    for sink, domain in ((first, "one.test"), (second, "two.test")):
        with smtplib.SMTP(*sink.address, timeout=10) as client:
            client.send_message(_message(f"side-{domain}@client.test", to=f"u@{domain}"))
    assert first.wait_for_message_id("side-one.test@client.test")[0].mailbox == "one.test"
    assert second.wait_for_message_id("side-two.test@client.test")[0].mailbox == "two.test"
    assert first.find("side-two.test@client.test") == []


def test_wait_for_port_times_out_on_a_closed_port() -> None:
    port = free_port()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.3)


def test_a_missing_program_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-mail-program"):
        require_program("no-such-mail-program")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-such-mail-program"):
        require_program("no-such-mail-program")
    assert require_program("sh").endswith("/sh")
