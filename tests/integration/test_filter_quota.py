"""The state-store filters in the real gateway: send quotas held and released, greylisting,
and one SQLite file shared by the SMTP worker processes."""

from __future__ import annotations

import contextlib
import os
import smtplib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.gateway import GatewayProcess, maildir_messages, running_gateway, wait_until

SENDER = "alice@corp.test"
RECIPIENT = "someone@elsewhere.test"


@pytest.fixture
def start_gateway(tmp_path: os.PathLike[str]) -> Iterator[Callable[..., GatewayProcess]]:
    # 127.0.0.1 is in relay.networks: its mail runs the outbound chain
    with contextlib.ExitStack() as started:

        def start(filters: str, *, workers: int = 1) -> GatewayProcess:
            return started.enter_context(running_gateway(str(tmp_path), workers=workers, extra=filters))

        yield start


def delivered(gateway: GatewayProcess, address: str = RECIPIENT) -> list[bytes]:
    local, domain = address.split("@")
    return maildir_messages(os.path.join(gateway.directory, "mail", domain, local))


def queue_rows(gateway: GatewayProcess) -> dict[str, str]:
    """queue id -> state, from `mailgatectl queue list`."""
    rows = {}
    for line in gateway.ctl("queue", "list").stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in ("incoming", "active", "deferred", "hold", "corrupt"):
            rows[fields[0]] = fields[1]
    return rows


def send(gateway: GatewayProcess, sender: str, subject: str, *, worker: int | None = None) -> str:
    """One message over its own connection (to SMTP worker ``worker`` if given); the
    queue id from the 250 reply."""
    with gateway.only_worker(worker) if worker is not None else contextlib.nullcontext():
        client = smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30)  # the banner read
    with client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


QUOTA = """
[filters]
outbound = ["quota"]
[filters.quota]
messages = 3
period = "1h"
"""


def test_past_its_quota_a_senders_mail_is_held_until_released(
    start_gateway: Callable[..., GatewayProcess], swaks: Any
) -> None:
    gateway = start_gateway(QUOTA)
    for number in range(1, 5):
        result = swaks(
            "--from", SENDER, "--to", RECIPIENT, "--helo", "client.test",
            "--header", f"Subject: message {number}",
            server=("127.0.0.1", gateway.smtp_port),
        )  # fmt: skip
        # the client is told nothing: the fourth is accepted like the others
        assert result.returncode == 0, result.transcript
        assert "250 2.0.0 Ok: queued as" in result.transcript
    wait_until(lambda: len(delivered(gateway)) == 3)
    log = gateway.wait_for_log("ALERT: send quota exceeded")
    assert (
        "ALERT: send quota exceeded by sender=<alice@corp.test> (4 messages in 1h, limit 3): "
        "holding its mail (a compromised account?)"
    ) in log
    [(held, state)] = queue_rows(gateway).items()
    assert state == "hold"
    time.sleep(2)  # two queue scans: a held message stays held
    assert len(delivered(gateway)) == 3
    assert gateway.ctl("queue", "show", held).stdout.startswith(f"queue id:  {held}\nstate:     hold")

    # a fifth: held too, and no second alert this hour
    result = swaks("--from", SENDER, "--to", RECIPIENT, server=("127.0.0.1", gateway.smtp_port))
    assert result.returncode == 0, result.transcript
    wait_until(lambda: len(queue_rows(gateway)) == 2)
    assert gateway.log().count("ALERT: send quota exceeded") == 1
    # another sender is not concerned
    result = swaks("--from", "bob@corp.test", "--to", RECIPIENT, server=("127.0.0.1", gateway.smtp_port))
    assert result.returncode == 0, result.transcript
    wait_until(lambda: len(delivered(gateway)) == 4)

    # the operator has looked: release the first held message and it is delivered
    assert gateway.ctl("queue", "release", held).stdout.strip() == f"{held}: release done"
    wait_until(lambda: len(delivered(gateway)) == 5)
    assert any(b"Subject: message 4" in message for message in delivered(gateway))
    assert list(queue_rows(gateway).values()) == ["hold"]


def test_the_smtp_worker_processes_share_one_count(start_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = start_gateway(QUOTA.replace("messages = 3", "messages = 1"), workers=2)
    # each sender sends two messages over two connections, one to each worker (either
    # way round): the second must be held though the other worker counted the first
    workers = sorted(gateway.worker_pids())
    firsts: list[str] = []
    seconds: list[str] = []
    for number, (one, other) in enumerate([workers, workers[::-1], workers]):
        sender = f"user{number}@corp.test"
        firsts.append(send(gateway, sender, f"{sender} 1", worker=one))
        # the first worker's store thread commits the count just after its 250
        time.sleep(0.05)
        seconds.append(send(gateway, sender, f"{sender} 2", worker=other))
    # a queue id carries its worker's tag (character 12)
    assert all(first[11] != second[11] for first, second in zip(firsts, seconds, strict=True))
    wait_until(lambda: len(delivered(gateway)) == len(firsts))
    rows = queue_rows(gateway)
    assert rows == dict.fromkeys(seconds, "hold")
    # one file, seen by both workers: one counter per sender
    connection = sqlite3.connect(os.path.join(gateway.directory, "state", "state.sqlite"))
    counts = dict(connection.execute("SELECT key, count FROM counters WHERE tbl = 'quota.messages'"))
    connection.close()
    assert counts == {f"sender=<user{n}@corp.test>": 2 for n in range(len(firsts))}


def test_greylisting_defers_a_first_attempt_and_passes_a_retry(
    start_gateway: Callable[..., GatewayProcess], swaks: Any
) -> None:
    gateway = start_gateway(
        """
[filters]
outbound = ["greylist"]
[filters.greylist]
delay = "2s"
retry_window = "1h"
""",
        workers=2,
    )
    first = swaks("--from", SENDER, "--to", RECIPIENT, server=("127.0.0.1", gateway.smtp_port))
    assert first.returncode == 24, first.transcript  # swaks: RCPT refused
    assert "450 4.7.1 Greylisted, please try again in 2 seconds" in first.transcript
    time.sleep(2.1)
    retry = swaks("--from", SENDER, "--to", RECIPIENT, server=("127.0.0.1", gateway.smtp_port))
    assert retry.returncode == 0, retry.transcript
    wait_until(lambda: len(delivered(gateway)) == 1)
    gateway.wait_for_log("greylist: 127.0.0.0/24 alice@corp.test someone@elsewhere.test passed after")
    # the client network has retried once: its next new triplet is not delayed
    other = swaks(
        "--from", "bob@corp.test", "--to", "x@elsewhere.test", server=("127.0.0.1", gateway.smtp_port)
    )
    assert other.returncode == 0, other.transcript
