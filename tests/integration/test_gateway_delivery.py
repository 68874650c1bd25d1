"""The real gateway delivering to real peers: Postfix as the internal server, NSD for MX,
a Postfix smart host that requires AUTH, and mailgatectl on deferred mail."""

from __future__ import annotations

import contextlib
import os
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.gateway import GatewayProcess, free_port, running_gateway, wait_until
from tests.integration.peers import NsdServer, PostfixRelayWithAuth, PostfixSink

USER, PASSWORD = "exchange", "s3cret-relay-pass"


@pytest.fixture
def start_gateway(tmp_path: os.PathLike[str]) -> Iterator[Callable[[str], GatewayProcess]]:
    with contextlib.ExitStack() as started:

        def start(extra: str) -> GatewayProcess:
            from gateway.smtp.auth import hash_password

            tmp = str(tmp_path)
            with open(os.path.join(tmp, "users"), "w") as handle:
                handle.write(f"{USER}:{hash_password(PASSWORD)}\n")
            gateway = running_gateway(
                tmp,
                role="submission",
                credentials_file=f"{tmp}/users",
                domains=["internal.test"],
                route=None,
                delivery='retry_schedule = ["2s"]\nmax_attempts = 10',
                extra=extra,
            )
            return started.enter_context(gateway)

        yield start


def send(
    gateway: GatewayProcess,
    sender: str,
    recipients: list[str],
    message_id: str,
    *,
    source: str = "127.0.0.1",
    auth: bool = False,
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, source_address=(source, 0), timeout=30) as client:
        client.ehlo("client.test")
        if auth:
            client.starttls()
            client.ehlo("client.test")
            client.login(USER, PASSWORD)
        return client.sendmail(sender, recipients, f"Message-Id: {message_id}\r\nSubject: t\r\n\r\nhello\r\n")


def test_relay_over_starttls_and_auth_to_postfix(
    start_gateway: Any, postfix_sink: PostfixSink, swaks: Any
) -> None:
    gateway = start_gateway(
        f'[[routes]]\nmatch = "internal.test"\ntransport = "smtp:[127.0.0.1]:{postfix_sink.port}"'
    )
    # 127.0.0.2 is not a relay client: only AUTH (after STARTTLS) lets it send
    result = swaks(
        "--to",
        "bob@internal.test",
        "--local-interface",
        "127.0.0.2",
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
        "--header",
        "Message-Id: <swaks-auth@c.test>",
        server=("127.0.0.1", gateway.smtp_port),
    )
    assert result.returncode == 0, result.transcript
    [received] = postfix_sink.wait_for_message_id("<swaks-auth@c.test>")
    assert received.envelope_recipient == "bob@internal.test"
    assert "by gw.test with ESMTPSA" in str(received.message.get_all("Received"))
    gateway.wait_for_log("status=sent (250 2.0.0 Ok: queued as")


def test_submission_port_refuses_unauthenticated_strangers(start_gateway: Any, swaks: Any) -> None:
    gateway = start_gateway("")
    result = swaks(
        "--to", "bob@internal.test", "--local-interface", "127.0.0.2", server=("127.0.0.1", gateway.smtp_port)
    )
    assert "530 5.7.0 Authentication required" in result.transcript
    assert result.returncode != 0


class MxSink(PostfixSink):
    """A Postfix that an MX record points at: port 25 on its own loopback address."""

    host = "127.0.0.25"

    def __init__(self, **kwargs: Any) -> None:
        # Postfix refuses inet_interfaces that no interface has by name; lo has 127.0.0.1/8
        super().__init__(extra_main_cf={"inet_interfaces": "all"}, **kwargs)

    def _choose_port(self) -> int:
        return 25


ZONE = {
    "dest.test.": """
        @           IN MX 10 mx
        mx          IN A     127.0.0.25
        nullmx      IN MX 0  .
        broken      IN MX 10 nowhere
    """
}


def test_mx_routing_with_a_real_dns_server_and_null_mx_bounce(
    start_gateway: Any, make_nsd: Callable[..., NsdServer], postfix_sink: PostfixSink
) -> None:
    if os.getuid() != 0:
        pytest.fail("binding port 25 for the MX test needs root")
    nsd = make_nsd(ZONE)
    gateway = start_gateway(
        f'[dns]\nnameservers = ["{nsd.nameserver}"]\n'
        f'[[routes]]\nmatch = "internal.test"\ntransport = "smtp:[127.0.0.1]:{postfix_sink.port}"\n'
        '[[routes]]\nmatch = "*"\ntransport = "mx"\n'
    )
    real = MxSink(domains=("dest.test",))
    real.start()
    try:
        send(gateway, "alice@internal.test", ["carol@dest.test", "nobody@nullmx.dest.test"], "<mx-1@c.test>")
        [received] = real.wait_for_message_id("<mx-1@c.test>")
        assert received.envelope_recipient == "carol@dest.test"
        # the null MX recipient bounces at once (RFC 7505), to the sender at the internal server
        [bounce] = postfix_sink.wait_for_messages(1, timeout=30)
        text = bounce.message.as_string()
        assert bounce.envelope_recipient == "alice@internal.test"
        assert bounce.envelope_sender in ("", "<>", "MAILER-DAEMON")
        assert bounce.message.get_content_type() == "multipart/report"
        assert bounce.message.get_param("report-type") == "delivery-status"
        assert "Final-Recipient: rfc822; nobody@nullmx.dest.test" in text
        assert "Action: failed" in text and "Status: 5.1.10" in text
        assert "Message-Id: <mx-1@c.test>" in text
    finally:
        real.stop()


def upstream_config(tmp: str, relay: PostfixRelayWithAuth, password: str) -> str:
    """Everything to the upstream smart host, with AUTH over required TLS."""
    password_file = os.path.join(tmp, "upstream-password")
    with open(password_file, "w") as handle:
        handle.write(password + "\n")
    return (
        f'[upstream]\nhost = "[127.0.0.1]:{relay.port}"\nmode = "always"\nusername = "{relay.user}"\n'
        f'password_file = "{password_file}"\ntls = "encrypt"\n[[routes]]\nmatch = "*"\ntransport = "relay"\n'
    )


def test_upstream_relay_requiring_auth(
    start_gateway: Any,
    tmp_path: os.PathLike[str],
    postfix_relay: PostfixRelayWithAuth,
    postfix_sink: PostfixSink,
) -> None:
    gateway = start_gateway(upstream_config(str(tmp_path), postfix_relay, postfix_relay.password))
    send(gateway, "alice@client.test", ["erin@internal.test"], "<relay-1@c.test>")
    [received] = postfix_sink.wait_for_message_id("<relay-1@c.test>", timeout=30)
    received_headers = " ".join(received.message.get_all("Received"))
    assert "smarthost.upstream.test" in received_headers  # it went through the upstream
    assert "by gw.test" in received_headers
    gateway.wait_for_log("status=sent")


def test_upstream_relay_with_a_wrong_password_defers(
    start_gateway: Any, tmp_path: os.PathLike[str], postfix_relay: PostfixRelayWithAuth
) -> None:
    gateway = start_gateway(upstream_config(str(tmp_path), postfix_relay, "wrong"))
    send(gateway, "alice@client.test", ["erin@internal.test"], "<relay-2@c.test>")
    text = gateway.wait_for_log("status=deferred")
    assert "erin@internal.test" in text


def test_mailgatectl_on_deferred_mail(start_gateway: Any) -> None:
    closed = free_port()  # nothing listens there: connection refused
    gateway = start_gateway(f'[[routes]]\nmatch = "internal.test"\ntransport = "smtp:[127.0.0.1]:{closed}"')
    send(gateway, "alice@client.test", ["frank@internal.test"], "<deferred-1@c.test>")
    gateway.wait_for_log("status=deferred")
    listing = gateway.ctl("queue", "list").stdout
    assert "frank@internal.test" in listing
    assert "Connection refused" in listing
    queue_id = listing.splitlines()[1].split()[0]
    shown = gateway.ctl("queue", "show", queue_id).stdout
    assert "Message-Id: <deferred-1@c.test>" in shown
    assert "state:     deferred" in shown
    gateway.ctl("queue", "hold", queue_id)
    assert " hold " in gateway.ctl("queue", "list").stdout
    flush = gateway.ctl("queue", "flush", queue_id, check=False)
    assert flush.returncode == 1 and "on hold" in flush.stderr
    gateway.ctl("queue", "release", queue_id)
    assert "flushed 1" in gateway.ctl("queue", "flush", queue_id).stdout
    gateway.ctl("queue", "delete", queue_id)
    wait_until(lambda: gateway.ctl("queue", "list").stdout.strip() == "Mail queue is empty")
    missing = gateway.ctl("queue", "show", queue_id, check=False)
    assert missing.returncode == 1 and "no such message" in missing.stderr


def test_deferred_mail_is_delivered_when_the_server_comes_back(
    start_gateway: Any, make_postfix_sink: Any
) -> None:
    port = free_port()
    gateway = start_gateway(f'[[routes]]\nmatch = "internal.test"\ntransport = "smtp:[127.0.0.1]:{port}"')
    send(gateway, "alice@client.test", ["gina@internal.test"], "<later-1@c.test>")
    gateway.wait_for_log("status=deferred")

    class FixedPortSink(PostfixSink):
        def _choose_port(self) -> int:
            return port

    sink = FixedPortSink()
    sink.start()
    try:
        sink.wait_for_message_id("<later-1@c.test>", timeout=30)  # the retry schedule is 2 s
    finally:
        sink.stop()


def test_kill_9_under_load_loses_nothing_at_the_receiving_server(
    start_gateway: Any, postfix_sink: PostfixSink
) -> None:
    gateway = start_gateway(
        f'[[routes]]\nmatch = "internal.test"\ntransport = "smtp:[127.0.0.1]:{postfix_sink.port}"'
    )
    acknowledged: list[str] = []
    stop = threading.Event()

    def sender(worker: int) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            message_id = f"<crash-{worker}-{number}@c.test>"
            try:
                send(gateway, "load@client.test", ["crash@internal.test"], message_id)
                acknowledged.append(message_id)  # only once the 250 came
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for worker in workers:
        worker.start()
    wait_until(lambda: len(acknowledged) >= 200, timeout=60)
    gateway.kill9()
    stop.set()
    for worker in workers:
        worker.join()
    sent = set(acknowledged)
    gateway.start()

    def arrived() -> set[str]:
        return {f"<{m.message_id}>" for m in postfix_sink.messages()}

    wait_until(lambda: sent <= arrived(), timeout=90, interval=0.5)
    assert len(sent) >= 200
    lost = sent - arrived()
    assert not lost, f"lost {len(lost)}: {sorted(lost)[:5]}"
