"""IMAP IDLE in the real gateway (twistd) against a real Dovecot: two accounts, three folders
watched at once, each polled every hour only, so new mail reaching the gateway's Maildir
within seconds can only be IDLE's doing; fetched mail moved to another folder (move_to)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.gateway import GatewayProcess, gateway_config, maildir_messages, wait_until
from tests.integration.peer_dovecot_mail import DovecotMail
from tests.integration.peers import free_port, require_program, require_root

pytestmark = pytest.mark.integration

WITHIN = 5.0  # seconds from the delivery into Dovecot to the gateway's Maildir


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotMail]:
    require_program("dovecot")
    require_root()
    peer = DovecotMail(users={"sales": "sales-secret-1", "info": "info-secret-2"})
    peer.start(timeout=60)
    yield peer
    peer.stop()


def message(subject: str) -> bytes:
    return (
        f"Return-Path: <alice@outside.test>\r\nFrom: alice@outside.test\r\nTo: someone@outside.test\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@outside.test>\r\n\r\nhello\r\n"
    ).encode()


def account(dovecot: DovecotMail, directory: str, user: str, options: str) -> str:
    secret = os.path.join(directory, f"{user}.pass")
    with open(secret, "w") as handle:
        handle.write(dovecot.password(user) + "\n")
    os.chmod(secret, 0o600)
    return f"""
[[fetch.accounts]]
name = "{user}"
protocol = "imap"
server = "127.0.0.1"
port = {dovecot.imap_port}
tls = "starttls"
ca_file = "{dovecot.ca_file}"
tls_name = "localhost"
username = "{user}"
password_file = "{secret}"
interval = "1h"
idle = true
deliver_to = ["{user}@corp.example"]
{options}
"""


def subjects(path: str) -> list[str]:
    found = []
    for raw in maildir_messages(path):
        for line in raw.split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n").split(b"\n"):
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
    return sorted(found)


def holding(path: str, wanted: list[str]) -> Callable[[], bool]:
    """Whether the Maildir holds exactly the messages with these subjects (in any order)."""
    return lambda: subjects(path) == sorted(wanted)


def test_new_mail_in_any_watched_folder_arrives_within_seconds_with_an_hourly_interval(
    dovecot: DovecotMail, tmp_path: os.PathLike[str]
) -> None:
    directory = str(tmp_path)
    dovecot.maildir("sales", "Ventes")  # the second folder exists before the gateway watches it
    extra = "[fetch]\n" + account(
        dovecot, directory, "sales", 'folders = ["INBOX", "Ventes"]\nmove_to = "Fetched"'
    )
    extra += account(dovecot, directory, "info", "keep = true")
    port = free_port()
    gateway = GatewayProcess(
        directory, gateway_config(directory, port, domains=("corp.example",), extra=extra), port
    )
    dovecot.deliver("sales", message("before start"))
    mail = os.path.join(directory, "mail", "corp.example")
    try:
        gateway.start()
        for account_name, folder in (("sales", "INBOX"), ("sales", "Ventes"), ("info", "INBOX")):
            gateway.wait_for_log(f"fetch: {account_name}: watching {folder} in IDLE", timeout=60)
        wait_until(lambda: subjects(os.path.join(mail, "sales")) == ["before start"])  # the first poll's
        assert [stored.content for stored in dovecot.messages("sales", "Fetched")] == [
            message("before start")
        ]

        # after the first poll: only IDLE can bring these before the hour is over
        for round_number in (1, 2):
            started = time.monotonic()
            dovecot.deliver("sales", message(f"inbox {round_number}"))
            dovecot.deliver("sales", message(f"ventes {round_number}"), folder="Ventes")
            dovecot.deliver("info", message(f"info {round_number}"))
            wanted_sales = ["before start"] + [
                f"{folder} {n}" for n in range(1, round_number + 1) for folder in ("inbox", "ventes")
            ]
            wait_until(holding(os.path.join(mail, "sales"), wanted_sales), timeout=30)
            wait_until(holding(os.path.join(mail, "info"), [f"info {n}" for n in range(1, round_number + 1)]))
            took = time.monotonic() - started
            assert took < WITHIN, f"round {round_number}: {took:.1f} s from Dovecot to the Maildir"
        assert dovecot.messages("sales") == [] and dovecot.messages("sales", "Ventes") == []
        assert len(dovecot.messages("sales", "Fetched")) == 5  # moved there, not deleted
        assert len(dovecot.messages("info")) == 2  # kept, and not fetched twice
        status = gateway.ctl("fetch", "status").stdout
        assert "sales (imap sales@127.0.0.1:" in status and "messages 5," in status, status
        assert "info (imap info@127.0.0.1:" in status and "messages 2," in status, status
    finally:
        gateway.stop()
    log = gateway.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-4000:]
    assert "IDLE on" not in log, log[-4000:]  # no watcher dropped on the way
