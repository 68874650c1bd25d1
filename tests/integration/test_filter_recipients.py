"""Recipient validation against a real internal server: the gateway as a process, asking a
Postfix that knows its users (SMTP callouts), swaks as the Internet client."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.gateway import GatewayProcess, running_gateway
from tests.integration.peer_postfix_users import PostfixWithUsers
from tests.integration.peers import CertificateAuthority, require_program, require_root

USERS = ("alice@internal.test", "catchall@internal.test")
CALLOUT = """
[filters]
inbound = ["recipients"]
[filters.recipients]
mode = "callout"
"""


@pytest.fixture
def internal_server(_peers: Any, test_ca: CertificateAuthority) -> PostfixWithUsers:
    for program in ("postfix", "postconf", "openssl"):
        require_program(program)
    require_root()
    server: PostfixWithUsers = _peers.start(PostfixWithUsers(users=USERS, ca=test_ca))
    return server


@pytest.fixture
def start_gateway(
    tmp_path: os.PathLike[str], internal_server: PostfixWithUsers
) -> Iterator[Callable[[str], GatewayProcess]]:
    with contextlib.ExitStack() as started:

        def start(options: str = "") -> GatewayProcess:
            gateway = running_gateway(
                str(tmp_path),
                workers=1,  # one SMTP process: one callout cache (each process has its own)
                domains=["internal.test"],
                networks=["192.0.2.0/24"],  # not loopback: swaks on 127.0.0.1 is the Internet here
                route=("internal.test", f"smtp:[127.0.0.1]:{internal_server.port}"),
                delivery='retry_schedule = ["1s"]',
                extra=CALLOUT + options,
            )
            return started.enter_context(gateway)

        yield start


def send(gateway: GatewayProcess, recipient: str, message_id: str) -> Any:
    require_program("swaks")
    from tests.integration.peers import swaks

    return swaks(
        "--from", "someone@outside.test", "--to", recipient, "--helo", "client.outside.test",
        "--header", f"Message-Id: <{message_id}>",
        server=("127.0.0.1", gateway.smtp_port),
    )  # fmt: skip


def rcpt_reply(transcript: str) -> str:
    """The server's reply to RCPT TO in a swaks transcript."""
    lines = transcript.splitlines()
    for number, line in enumerate(lines):
        if " RCPT TO:" in line:
            for reply in lines[number + 1 :]:
                if re.match(r"^(<-|<\*\*) +\d{3}", reply):
                    return re.sub(r"^(<-|<\*\*) +", "", reply)
    raise AssertionError(f"no RCPT reply in:\n{transcript}")


def test_known_user_is_delivered_and_unknown_user_refused_at_rcpt(
    start_gateway: Any, internal_server: PostfixWithUsers
) -> None:
    gateway = start_gateway()
    known = send(gateway, "alice@internal.test", "known@outside.test")
    assert known.returncode == 0, known.transcript
    [received] = internal_server.wait_for_message_id("<known@outside.test>")
    assert received.mailbox == internal_server.mailbox("alice@internal.test")

    unknown = send(gateway, "nobody@internal.test", "unknown@outside.test")
    assert rcpt_reply(unknown.transcript) == (
        "550 5.1.1 <nobody@internal.test>: Recipient address rejected: User unknown"
    )
    assert unknown.returncode == 24  # swaks: RCPT refused
    # the refusal came from the internal server's own answer to our callout
    assert "NOQUEUE: reject: RCPT from" in internal_server.log_text()
    gateway.wait_for_log("recipients: callout for <nobody@internal.test>: unknown")


def test_catch_all_receives_mail_for_unknown_users(
    start_gateway: Any, internal_server: PostfixWithUsers
) -> None:
    gateway = start_gateway('catch_all = "catchall@internal.test"')
    result = send(gateway, "typo@internal.test", "typo@outside.test")
    assert result.returncode == 0, result.transcript
    assert rcpt_reply(result.transcript).startswith("250")
    [received] = internal_server.wait_for_message_id("<typo@outside.test>")
    assert received.mailbox == internal_server.mailbox("catchall@internal.test")
    assert received.envelope_recipient == "catchall@internal.test"
    # the log keeps who it was for
    gateway.wait_for_log("redirected to=<typo@internal.test> -> <catchall@internal.test>")


def test_internal_server_down_defers_never_refuses(
    start_gateway: Any, internal_server: PostfixWithUsers
) -> None:
    gateway = start_gateway()
    first = send(gateway, "alice@internal.test", "before@outside.test")
    assert first.returncode == 0, first.transcript
    internal_server.wait_for_message_id("<before@outside.test>")
    internal_server.shutdown()

    result = send(gateway, "bob@internal.test", "down@outside.test")
    assert rcpt_reply(result.transcript) == (
        "450 4.1.1 <bob@internal.test>: Recipient address verification in progress, try again later"
    )
    assert not re.search(r"^(<-|<\*\*) +5\d\d", result.transcript, re.MULTILINE), result.transcript
    gateway.wait_for_log("recipients: callout for <bob@internal.test>: unverified")
    # a user verified before is still known from the cache: its mail is taken and queued
    cached = send(gateway, "alice@internal.test", "cached@outside.test")
    assert cached.returncode == 0, cached.transcript
