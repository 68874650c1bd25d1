"""The documented example's filter chains, as a new user would run them.

The gateway runs with the ``[filters]`` part of etc/mailgate.toml verbatim, except
that the public DNS lists' names are those of test zones that NSD serves on
loopback (the same syntax, weights and reply filters), with a Postfix that knows
its users as the internal server. swaks sessions from 127.0.0.x clients trip each
layer: a listed client, an early talker, a HELO claiming to be us, a sender domain
on a domain list or that does not exist, an unknown user; and legitimate mail,
with and without reverse DNS, arrives. Every refusal names its reason in the reply
and in the log. (Each new client waits the example's 6 s greeting pause once.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.gateway import ROOT, GatewayProcess, running_gateway
from tests.integration.peer_postfix_users import PostfixWithUsers
from tests.integration.peers import CertificateAuthority, NsdServer, require_program, require_root, swaks

pytestmark = pytest.mark.integration

# the public lists of the example, and the test zones standing in for them
LISTS = {
    "zen.spamhaus.org": "zen.test",
    "bl.spamcop.net": "bl.test",
    "list.dnswl.org": "wl.test",
    "dbl.spamhaus.org": "dbl.test",
}
ZONES = {
    "sender.test": """
        @        IN MX 10 mail
        mail     IN A     127.0.0.20
        spammer  IN MX 10 mail
    """,
    # reverse DNS: 127.0.0.20 is mail.sender.test (and back); 127.0.0.21 has no PTR
    "0.0.127.in-addr.arpa": """
        20       IN PTR   mail.sender.test.
    """,
    # 127.0.0.2 on the zen-like list with a code the example counts (weight 3: over the threshold)
    "zen.test": "2.0.0.127 IN A 127.0.0.2",
    "bl.test": "4.0.0.127 IN A 127.0.0.2",
    "wl.test": "9.0.0.127 IN A 127.0.10.2",
    "dbl.test": "spammer.sender.test IN A 127.0.1.2",
}
USERS = ("alice@internal.test",)


def example_filters() -> str:
    """The [filters] part of etc/mailgate.toml (the last part of the file), lists renamed."""
    with open(os.path.join(ROOT, "etc", "mailgate.toml"), encoding="utf-8") as handle:
        text = handle.read()
    filters = text[text.index("\n[filters]\n") :]
    for public, test in LISTS.items():
        assert public in filters, f"the example no longer uses {public}"
        filters = filters.replace(public, test)
    return filters


@pytest.fixture
def gateway(
    _peers: Any, test_ca: CertificateAuthority, tmp_path: os.PathLike[str]
) -> Iterator[tuple[GatewayProcess, PostfixWithUsers]]:
    for program in ("postfix", "postconf", "openssl", "nsd", "nsd-checkconf", "nsd-checkzone", "swaks"):
        require_program(program)
    require_root()
    nsd: NsdServer = _peers.start(NsdServer(ZONES))
    internal: PostfixWithUsers = _peers.start(PostfixWithUsers(users=USERS, ca=test_ca))
    with contextlib.ExitStack() as stack:
        process = stack.enter_context(
            running_gateway(
                str(tmp_path),
                workers=1,  # one SMTP process: a client waits the greeting pause once
                domains=["internal.test"],
                networks=["127.0.0.1/32"],  # only the harness; 127.0.0.2 and up are the Internet
                route=("internal.test", f"smtp:[127.0.0.1]:{internal.port}"),
                nameserver=nsd.nameserver,
                extra=example_filters(),
            )
        )
        yield process, internal


def send(gateway: GatewayProcess, client: str, sender: str, recipient: str, tag: str, helo: str) -> Any:
    return swaks(
        "--from", sender, "--to", recipient, "--helo", helo, "--local-interface", client,
        "--header", f"Message-Id: <{tag}@test>",
        server=("127.0.0.1", gateway.smtp_port),
    )  # fmt: skip


def test_each_layer_of_the_example_chain(gateway: tuple[GatewayProcess, PostfixWithUsers]) -> None:
    process, internal = gateway
    good = "127.0.0.20"  # mail.sender.test, forward-confirmed

    # legitimate mail arrives, untouched by the filters
    result = send(process, good, "bob@sender.test", "alice@internal.test", "good", "mail.sender.test")
    assert result.returncode == 0, result.transcript
    [received] = internal.wait_for_message_id("<good@test>")
    assert received.mailbox == internal.mailbox("alice@internal.test")

    # recipient validation (a callout to the internal server): an unknown user
    result = send(process, good, "bob@sender.test", "nobody@internal.test", "unknown", "mail.sender.test")
    assert "550 5.1.1 <nobody@internal.test>: Recipient address rejected: User unknown" in result.transcript

    # helo: a client claiming to be the gateway
    result = send(process, good, "bob@sender.test", "alice@internal.test", "forged-helo", "gw.test")
    assert result.returncode != 0
    process.wait_for_log("filter: helo reject at helo [127.0.0.20]")

    # rhsbl: the sender's domain is on the domain list
    result = send(process, good, "x@spammer.sender.test", "alice@internal.test", "rhsbl", "mail.sender.test")
    assert "554 5.7.1" in result.transcript and "dbl.test" in result.transcript

    # sender-domain: a domain that does not exist
    result = send(
        process, good, "x@nowhere.sender.test", "alice@internal.test", "nodomain", "mail.sender.test"
    )
    assert "550 5.1.8" in result.transcript and "Domain not found" in result.transcript

    # dnsbl at connect: a listed client is refused instead of the banner
    result = send(
        process, "127.0.0.2", "bob@sender.test", "alice@internal.test", "listed", "mail.sender.test"
    )
    assert "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test" in result.transcript
    assert "220 " not in result.transcript

    # reverse-dns: no PTR is tagged, not refused (nothing legitimate is lost)
    result = send(
        process, "127.0.0.21", "bob@sender.test", "alice@internal.test", "noptr", "mail.sender.test"
    )
    assert result.returncode == 0, result.transcript
    [received] = internal.wait_for_message_id("<noptr@test>")
    assert received.message["X-Mailgate-Reverse-Dns"] is not None
    assert "reverse-dns=tag" in str(received.message["X-Mailgate-Filters"])

    # protocol: an early talker
    with socket.create_connection(("127.0.0.1", process.smtp_port), source_address=("127.0.0.22", 0)) as sock:
        sock.sendall(b"EHLO spam.example\r\n")
        sock.settimeout(30)
        replies = b""
        deadline = time.monotonic() + 30
        while b"554 5.5.1" not in replies and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            replies += chunk
            if b"\r\n250 " in replies:
                sock.sendall(b"MAIL FROM:<bob@sender.test>\r\n")
    assert b"554 5.5.1 Protocol error: talked before the greeting" in replies

    # and nothing legitimate was lost on the way: both good messages are at the internal server
    assert {m.message_id for m in internal.messages()} == {"good@test", "noptr@test"}
