"""kill -9 of the real gateway in the middle of a fetch, then a restart, against a real Dovecot:
nothing lost, nothing fetched twice beyond the one in flight (POP3 deleting, IMAP keeping);
then kept mail deleted on the server once `delete_after` has passed, without fetching it again.

Each mailbox holds 320 messages, one in eight of 200 KB, so a poll takes long enough to be
killed half-way: the kill comes once some of them reached the gateway's Maildir, and the
server still holding every message afterwards shows the poll did not finish. A message
fetched twice is two queue entries (two queue ids in our Received header); a delivery into the
Maildir repeated after the kill (the queue's own at-least-once) has one queue id, and is not
a fetch.
"""

from __future__ import annotations

import collections
import email.parser
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.gateway import GatewayProcess, gateway_config, maildir_messages, wait_until
from tests.integration.peer_dovecot_mail import DovecotMail
from tests.integration.peers import free_port, require_program, require_root

pytestmark = pytest.mark.integration

TOTAL = 320
LARGE_EVERY = 8  # one message in 8 is LARGE octets
LARGE = 200 * 1024
KILL_AFTER = 25  # messages in the Maildir before the kill


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotMail]:
    require_program("dovecot")
    require_root()
    peer = DovecotMail(users={"dropped": "dropped-secret-1", "kept": "kept-secret-2"})
    peer.start(timeout=60)
    yield peer
    peer.stop()


def message(user: str, number: int) -> bytes:
    body = b"hello\r\n"
    if number % LARGE_EVERY == 0:
        line = b"%075d\r\n" % number
        body = line * (LARGE // len(line))
    return (
        f"Return-Path: <alice@outside.test>\r\nFrom: alice@outside.test\r\nTo: {user}@outside.test\r\n"
        f"Subject: number {number}\r\nMessage-ID: <{user}-{number}@outside.test>\r\n\r\n"
    ).encode() + body


def load(dovecot: DovecotMail, user: str) -> set[str]:
    """The mailbox filled; the Message-IDs put there."""
    for number in range(1, TOTAL + 1):
        dovecot.deliver(user, message(user, number))
    return {f"<{user}-{number}@outside.test>" for number in range(1, TOTAL + 1)}


def start_gateway(
    dovecot: DovecotMail, directory: str, user: str, protocol: str, options: str = ""
) -> GatewayProcess:
    """A gateway (in the main process only) with one account fetching `user`'s mailbox hourly."""
    secret = os.path.join(directory, f"{user}.pass")
    with open(secret, "w") as handle:
        handle.write(dovecot.password(user) + "\n")
    os.chmod(secret, 0o600)
    port, tls = (dovecot.pop3s_port, "implicit") if protocol == "pop3" else (dovecot.imap_port, "starttls")
    extra = f"""
[fetch]
[[fetch.accounts]]
name = "{user}"
protocol = "{protocol}"
server = "127.0.0.1"
port = {port}
tls = "{tls}"
ca_file = "{dovecot.ca_file}"
tls_name = "localhost"
username = "{user}"
password_file = "{secret}"
interval = "1h"
deliver_to = ["{user}@corp.example"]
{options}
"""
    smtp_port = free_port()
    text = gateway_config(directory, smtp_port, workers=0, domains=("corp.example",), extra=extra)
    gateway = GatewayProcess(directory, text, smtp_port)
    gateway.start()
    return gateway


_HEADERS = email.parser.BytesHeaderParser()


def fetched(directory: str, user: str) -> dict[str, set[str]]:
    """Message-ID -> the queue ids it was fetched under (from our Received header), in the Maildir."""
    found: dict[str, set[str]] = collections.defaultdict(set)
    for raw in maildir_messages(os.path.join(directory, "mail", "corp.example", user)):
        headers = _HEADERS.parsebytes(raw)
        ours = [value for value in headers.get_all("Received", []) if "(MailGate account" in value]
        match = re.search(r"\bid (\S+)", ours[0]) if ours else None
        assert match, f"no Received header of the fetch in {raw[:600]!r}"
        found[str(headers["Message-ID"])].add(match.group(1))
    return found


def copies(directory: str, user: str) -> int:
    return len(maildir_messages(os.path.join(directory, "mail", "corp.example", user)))


def kill_during_the_fetch(gateway: GatewayProcess, directory: str, user: str) -> None:
    """`mailgatectl fetch now` in the background; kill -9 once some mail came through."""
    asking = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", gateway.config_path, "fetch", "now"],
        cwd=directory,
        env=gateway.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: copies(directory, user) >= KILL_AFTER, timeout=60, interval=0.02)
        gateway.kill9()
    finally:
        asking.kill()
        asking.wait()


def fetch_until_empty(gateway: GatewayProcess, dovecot: DovecotMail, user: str) -> None:
    for _ in range(5):
        gateway.ctl("fetch", "now")
        if not dovecot.messages(user):
            return
    raise AssertionError(
        f"{len(dovecot.messages(user))} messages still on the server:\n{gateway.log()[-3000:]}"
    )


def check(directory: str, user: str, sent: set[str]) -> dict[str, set[str]]:
    """Every message arrived; at most one of them was fetched twice (the one in flight)."""
    wait_until(lambda: sent <= set(fetched(directory, user)), timeout=120, interval=0.5)
    arrived = fetched(directory, user)
    assert set(arrived) == sent
    twice = {message_id: ids for message_id, ids in arrived.items() if len(ids) > 1}
    assert len(twice) <= 1 and all(len(ids) == 2 for ids in twice.values()), twice
    return arrived


def test_pop3_deleting_killed_mid_fetch_loses_nothing_and_fetches_at_most_one_twice(
    dovecot: DovecotMail, tmp_path: os.PathLike[str]
) -> None:
    directory = str(tmp_path)
    sent = load(dovecot, "dropped")
    gateway = start_gateway(dovecot, directory, "dropped", "pop3")
    try:
        kill_during_the_fetch(gateway, directory, "dropped")
        assert len(dovecot.messages("dropped")) == TOTAL  # killed before QUIT: the server deleted none
        assert copies(directory, "dropped") < TOTAL
        gateway.start()
        fetch_until_empty(gateway, dovecot, "dropped")
        check(directory, "dropped", sent)
        assert copies(directory, "dropped") <= TOTAL + 2  # + the fetch and the delivery in flight
    finally:
        gateway.stop()


def test_imap_keeping_killed_mid_fetch_then_deleted_after_a_while_without_fetching_again(
    dovecot: DovecotMail, tmp_path: os.PathLike[str]
) -> None:
    directory = str(tmp_path)
    sent = load(dovecot, "kept")
    gateway = start_gateway(dovecot, directory, "kept", "imap", "keep = true")
    try:
        kill_during_the_fetch(gateway, directory, "kept")
        assert copies(directory, "kept") < TOTAL
        gateway.start()
        for _ in range(2):
            done = gateway.ctl("fetch", "now").stdout
            assert "error" not in done, done
        arrived = check(directory, "kept", sent)
        assert len(dovecot.messages("kept")) == TOTAL  # kept
        assert not any(stored.seen for stored in dovecot.messages("kept"))  # nor marked read
        gateway.stop()

        # the same account with delete_after: what was fetched that long ago goes, fetched once
        with open(gateway.config_path, encoding="utf-8") as handle:
            text = handle.read()
        with open(gateway.config_path, "w", encoding="utf-8") as handle:
            handle.write(text.replace("keep = true", 'keep = true\ndelete_after = "1s"'))
        gateway.start()
        done = gateway.ctl("fetch", "now").stdout
        assert f"kept: 0 message(s), {TOTAL} deleted on the server" in done, done
        assert dovecot.messages("kept") == []
        assert fetched(directory, "kept") == arrived
    finally:
        gateway.stop()
