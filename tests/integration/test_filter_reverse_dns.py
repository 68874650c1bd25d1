"""The reverse-dns filter in the real gateway, against NSD serving PTR records for 127.x clients
(rbldnsd serves no PTR): confirmed, not confirmed (refused), and no PTR (tagged)."""

from __future__ import annotations

import email
import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.gateway import GatewayProcess, mail_of, running_gateway, wait_until
from tests.integration.peers import NsdServer

pytestmark = pytest.mark.integration

ZONES = {
    "127.in-addr.arpa": """
        8.0.0   IN PTR mail.fcrdns.test.
        9.0.0   IN PTR liar.fcrdns.test.
    """,
    "fcrdns.test": """
        mail    IN A 127.0.0.8
        liar    IN A 192.0.2.1
    """,
}


FILTERS = """
[filters]
inbound = ["reverse-dns"]
[filters.reverse-dns]
no_ptr = "tag"
not_confirmed = "reject"
"""


def messages_to_bob(gateway: GatewayProcess) -> dict[str, email.message.Message]:
    return {str(message["Message-Id"]): message for message in mail_of(gateway, "bob@example.com")}


def test_confirmed_passes_not_confirmed_is_refused_and_no_ptr_is_tagged(
    make_nsd: Callable[..., NsdServer], swaks: Any, tmp_path: os.PathLike[str]
) -> None:
    nsd = make_nsd(ZONES)
    with running_gateway(str(tmp_path), workers=0, nameserver=nsd.nameserver, extra=FILTERS) as gateway:

        def send(client: str, tag: str) -> Any:
            return swaks(
                "--from", "friend@other.test", "--to", "bob@example.com", "--ehlo", "client.test",
                "--local-interface", client, "--header", f"Message-Id: <{tag}@client.test>",
                server=("127.0.0.1", gateway.smtp_port),
            )  # fmt: skip

        confirmed = send("127.0.0.8", "confirmed")
        assert confirmed.returncode == 0, confirmed.transcript
        liar = send("127.0.0.9", "liar")
        # a 450 at connect is sent as 421, and the session ends before the banner
        assert "421 4.7.1 Client host rejected: cannot find your hostname, [127.0.0.9]" in liar.transcript
        assert liar.returncode != 0
        nameless = send("127.0.0.10", "nameless")
        assert nameless.returncode == 0, nameless.transcript

        wait_until(
            lambda: {"<confirmed@client.test>", "<nameless@client.test>"} <= set(messages_to_bob(gateway))
        )
        delivered = messages_to_bob(gateway)
        assert delivered["<confirmed@client.test>"]["X-Mailgate-Reverse-Dns"] is None
        assert delivered["<nameless@client.test>"]["X-Mailgate-Reverse-Dns"] == "none"
        assert "<liar@client.test>" not in delivered
        gateway.wait_for_log("filter: reverse-dns defer at connect [127.0.0.9]: Client host rejected")
        gateway.wait_for_log(
            "filter: reverse-dns tag at connect [127.0.0.10]: client [127.0.0.10] has no reverse DNS"
        )
