"""The DNS filters in the real gateway, against a real rbldnsd: swaks sessions from 127.x
clients that are listed, unlisted, allow-listed, or listed by several zones at once; a listed
sender domain (rhsbl), a sender domain that does not exist (sender-domain), and a HELO that
claims to be the gateway (helo)."""

from __future__ import annotations

import email
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.gateway import GatewayProcess, delivered_message, running_gateway, wait_until
from tests.integration.peer_rbldnsd import Rbldnsd
from tests.integration.peers import require_program, require_root

pytestmark = pytest.mark.integration

ZONES = {
    # the block lists: 127.0.0.2 on zen; 127.0.0.4 on zen and bl2; 127.0.0.5 on bl2 only
    "zen.test": ("ip4set", """
        :127.0.0.2:Listed by zen.test, see https://zen.test/query/$
        127.0.0.2
        127.0.0.4 :127.0.0.4:
        127.0.0.6
        127.0.0.12
    """),
    "bl2.test": ("ip4set", """
        127.0.0.4
        127.0.0.5
    """),
    # the allow list (DNSWL style answers): 127.0.0.6 is on zen too, but trusted here
    "wl.test": ("ip4set", """
        :127.0.10.2:
        127.0.0.6
    """),
    # a list the second dnsbl instance asks at RCPT
    "rcpt-bl.test": ("ip4set", "127.0.0.7"),
    # sender domains
    "dbl.test": ("dnset", ":127.0.1.2:Spam domain $\nspammer.gen.test"),
    "gen.test": ("generic", """
        good MX 10 mail.good.gen.test
        mail.good A 192.0.2.10
        spammer MX 10 mail.good.gen.test
    """),
}  # fmt: skip


FILTERS = """
[filters]
inbound = ["helo", "dnsbl", "dnsbl-rcpt", "rhsbl", "sender-domain"]
[filters.dnsbl]
# down.example: a list rbldnsd does not serve (REFUSED), as a list that is down
zones = ["zen.test=127.0.0.[2..11]*3", "bl2.test*1", "wl.test=127.0.[0..255].[1..3]*-5",
         "down.example*5"]
threshold = 3
whitelist_threshold = -1
[filters.dnsbl-rcpt]
filter = "dnsbl"
zones = ["rcpt-bl.test"]
stage = "rcpt"
[filters.rhsbl]
zones = ["dbl.test"]
"""


@pytest.fixture(scope="module")
def rbldnsd() -> Iterator[Rbldnsd]:
    require_program("rbldnsd")
    require_root()
    peer = Rbldnsd(ZONES)
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def gateway(rbldnsd: Rbldnsd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    require_program("swaks")
    tmp = str(tmp_path_factory.mktemp("gateway"))
    with running_gateway(tmp, workers=1, nameserver=rbldnsd.nameserver, extra=FILTERS) as process:
        yield process


def send(swaks: Callable[..., Any], gateway: GatewayProcess, client: str, tag: str, **options: str) -> Any:
    # 127.0.0.1 is in relay.networks (the outbound chain); every other 127.x is the Internet
    return swaks(
        "--from", options.get("sender", "friend@good.gen.test"), "--to", "bob@example.com",
        "--ehlo", options.get("helo", "client.good.gen.test"), "--local-interface", client,
        "--header", f"Message-Id: <{tag}@client.test>",
        server=("127.0.0.1", gateway.smtp_port),
    )  # fmt: skip


def delivered(gateway: GatewayProcess, tag: str) -> bool:
    return delivered_message(gateway, "bob@example.com", f"<{tag}@client.test>") is not None


def message(gateway: GatewayProcess, tag: str) -> email.message.Message:
    found = delivered_message(gateway, "bob@example.com", f"<{tag}@client.test>")
    if found is None:
        raise AssertionError(f"{tag} was not delivered")
    return found


def test_a_listed_client_gets_554_naming_the_zone_instead_of_the_banner(
    gateway: GatewayProcess, rbldnsd: Rbldnsd, swaks: Any
) -> None:
    refused = send(swaks, gateway, "127.0.0.2", "listed")
    reply = (
        "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test; "
        "Listed by zen.test, see https://zen.test/query/127.0.0.2"
    )
    assert reply in refused.transcript
    assert "220 " not in refused.transcript
    assert refused.returncode != 0
    gateway.wait_for_log(
        "filter: dnsbl reject at connect [127.0.0.2]: Service unavailable; client [127.0.0.2]"
    )
    assert ("2.0.0.127.zen.test", "TXT") in rbldnsd.queries()


def test_an_unlisted_client_is_delivered_and_a_list_that_is_down_is_logged(
    gateway: GatewayProcess, swaks: Any
) -> None:
    accepted = send(swaks, gateway, "127.0.0.3", "unlisted")
    assert accepted.returncode == 0, accepted.transcript
    wait_until(lambda: delivered(gateway, "unlisted"))
    gateway.wait_for_log("filter: dnsbl: lookup of 3.0.0.127 in down.example failed")


def test_three_zones_asked_at_once_and_their_weights_add_up(
    gateway: GatewayProcess, rbldnsd: Rbldnsd, swaks: Any
) -> None:
    refused = send(swaks, gateway, "127.0.0.4", "two-lists")  # zen 3 + bl2 1
    assert (
        "554 5.7.1 Service unavailable; client [127.0.0.4] blocked using zen.test, bl2.test"
        in refused.transcript
    )
    asked = {name for name, rdtype in rbldnsd.queries() if rdtype == "A"}
    assert {"4.0.0.127.zen.test", "4.0.0.127.bl2.test", "4.0.0.127.wl.test"} <= asked

    under = send(swaks, gateway, "127.0.0.5", "one-small-list")  # bl2 only: 1 < 3
    assert under.returncode == 0, under.transcript
    wait_until(lambda: delivered(gateway, "one-small-list"))
    gateway.wait_for_log("[127.0.0.5] listed by bl2.test=127.0.0.2*1: score 1 under threshold 3")


def test_an_allow_listed_client_passes_although_a_block_list_has_it(
    gateway: GatewayProcess, swaks: Any
) -> None:
    accepted = send(swaks, gateway, "127.0.0.6", "allow-listed")  # zen 3, wl -5: -2 <= -1
    assert accepted.returncode == 0, accepted.transcript
    wait_until(lambda: delivered(gateway, "allow-listed"))
    gateway.wait_for_log(
        "filter: dnsbl accept at connect [127.0.0.6]: client [127.0.0.6] allowed by wl.test (score -2)"
    )


def test_at_rcpt_the_log_shows_sender_and_recipient(gateway: GatewayProcess, swaks: Any) -> None:
    refused = send(swaks, gateway, "127.0.0.7", "rcpt-listed")
    assert (
        "554 5.7.1 Service unavailable; client [127.0.0.7] blocked using rcpt-bl.test" in refused.transcript
    )
    assert "220 " in refused.transcript  # the banner came: this instance asks at RCPT
    assert refused.returncode == 24  # swaks: RCPT refused
    gateway.wait_for_log(
        "filter: dnsbl-rcpt reject at rcpt [127.0.0.7] from=<friend@good.gen.test> to=<bob@example.com>"
    )


def test_a_listed_sender_domain_and_a_missing_one_are_refused_at_mail(
    gateway: GatewayProcess, swaks: Any
) -> None:
    listed = send(swaks, gateway, "127.0.0.3", "rhsbl", sender="promo@spammer.gen.test")
    assert (
        "554 5.7.1 Service unavailable; sender domain [spammer.gen.test] blocked using dbl.test; "
        "Spam domain spammer.gen.test" in listed.transcript
    )
    assert listed.returncode == 23  # swaks: MAIL refused
    missing = send(swaks, gateway, "127.0.0.3", "no-domain", sender="someone@missing.gen.test")
    assert (
        "550 5.1.8 <someone@missing.gen.test>: Sender address rejected: Domain not found"
        in missing.transcript
    )
    assert missing.returncode == 23
    gateway.wait_for_log("filter: sender-domain reject at mail [127.0.0.3] from=<someone@missing.gen.test>")


def test_a_helo_claiming_to_be_the_gateway_is_refused(gateway: GatewayProcess, swaks: Any) -> None:
    forged = send(swaks, gateway, "127.0.0.3", "forged-helo", helo="gw.test")
    assert (
        "550 5.7.1 <gw.test>: Helo command rejected: that is this server's name or address"
        in forged.transcript
    )
    assert forged.returncode != 0
    assert not delivered(gateway, "forged-helo")


def _udp_socket_inodes() -> set[str]:
    found = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as handle:
            found.update(line.split()[9] for line in list(handle)[1:])
    return found


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_the_smtp_worker_asks_its_dns_through_the_main_process(gateway: GatewayProcess, swaks: Any) -> None:
    accepted = send(swaks, gateway, "127.0.0.3", "asked-by-main")  # every zone is asked about it
    assert accepted.returncode == 0, accepted.transcript
    assert gateway.process is not None
    main = gateway.process.pid
    workers = _children(main)
    assert workers, "no SMTP worker process"
    udp = _udp_socket_inodes()
    assert _socket_inodes(main) & udp  # the main process holds the name-server sockets
    for worker in workers:
        assert not _socket_inodes(worker) & udp, f"SMTP worker {worker} has UDP sockets of its own"
    # the same client again: its zones are answered from the main process's cache
    again = send(swaks, gateway, "127.0.0.3", "asked-by-main-again")
    assert again.returncode == 0, again.transcript
    [line] = [line for line in gateway.ctl("status").stdout.splitlines() if line.startswith("dns: ")]
    questions, hits = [int(word) for word in line.split() if word.isdigit()][:2]
    assert questions > 0 and hits >= 4, line  # its DNSBL, RHSBL and sender-domain lookups, at least


GREET_WAIT = 3.0


def test_the_zones_are_asked_while_the_client_waits_for_the_banner(rbldnsd: Rbldnsd, tmp_path: Any) -> None:
    # as postscreen: the DNSBL answers are there when the greet wait is over, not asked after it
    extra = (
        '[filters]\ninbound = ["protocol", "dnsbl"]\n'
        f'[filters.protocol]\ngreet_wait = "{GREET_WAIT:g}s"\n[filters.dnsbl]\nzones = ["zen.test"]\n'
    )
    with (
        running_gateway(str(tmp_path), workers=1, nameserver=rbldnsd.nameserver, extra=extra) as gateway,
        socket.socket() as client,
    ):
        client.bind(("127.0.0.12", 0))
        client.connect(("127.0.0.1", gateway.smtp_port))
        connected = time.monotonic()
        wait_until(lambda: ("12.0.0.127.zen.test", "A") in rbldnsd.queries(), timeout=GREET_WAIT - 0.5)
        client.setblocking(False)
        with pytest.raises(BlockingIOError):  # no banner yet: the client is still waiting
            client.recv(1024)
        assert time.monotonic() - connected < GREET_WAIT
        client.settimeout(10)
        banner = client.recv(1024)
    assert banner.startswith(b"554 5.7.1 Service unavailable; client [127.0.0.12] blocked using zen.test")
