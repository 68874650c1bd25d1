"""The "lists" filter in the real gateway: swaks from listed clients and senders, list
files with bad lines, and reloading the files (`mailgatectl reload`, SIGHUP) while it runs."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.gateway import (
    ROOT,
    TWISTD,
    GatewayProcess,
    delivered_message,
    free_port,
    gateway_config,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.integration

WORKERS = 2  # a reload must reach every SMTP worker process, not only the first


LISTS = """
    [filters]
    inbound = ["lists"]
    [filters.lists]
    block_clients = ["127.0.0.3"]
    allow_senders = ["boss@usa.test"]
    block_senders_files = ["lists/block-senders.txt"]
"""


@pytest.fixture
def gateway(tmp_path: os.PathLike[str], swaks: Any) -> Iterator[GatewayProcess]:
    tmp = str(tmp_path)
    os.mkdir(os.path.join(tmp, "lists"))
    write_list(tmp, "# senders we refuse\n@usa.test\n")
    with running_gateway(tmp, workers=WORKERS, extra=LISTS) as process:
        # every worker has built its chain (and can take SIGHUP) before the tests send anything
        wait_until(lambda: process.log().count("SmtpServerFactory starting on") >= WORKERS)
        yield process


def write_list(directory: str, text: str) -> None:
    path = os.path.join(directory, "lists", "block-senders.txt")
    with open(path + ".new", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".new", path)  # as an operator's editor would: never a half-written file


def send(
    swaks: Callable[..., Any], gateway: GatewayProcess, sender: str, tag: str, client: str = "127.0.0.2"
) -> Any:
    # 127.0.0.2 is not in relay.networks: an Internet client, so the inbound chain
    return swaks(
        "--from", sender, "--to", "bob@example.com", "--local-interface", client,
        "--header", f"Message-Id: <{tag}@client.test>",
        server=("127.0.0.1", gateway.smtp_port),
    )  # fmt: skip


def delivered(gateway: GatewayProcess, tag: str) -> bool:
    return delivered_message(gateway, "bob@example.com", f"<{tag}@client.test>") is not None


def reloads_seen(gateway: GatewayProcess) -> int:
    """How many processes (the main one and each worker) have reloaded the lists so far."""
    return gateway.log().count("lists reloaded:")


def test_blocked_sender_domain_gets_554_with_the_reason_and_others_are_delivered(
    gateway: GatewayProcess, swaks: Any
) -> None:
    refused = send(swaks, gateway, "promo@mail.usa.test", "blocked-1")
    assert "554 5.7.1 Access denied: sender domain usa.test is blocked" in refused.transcript
    assert refused.returncode == 23  # swaks: MAIL refused
    assert "block-senders.txt" not in refused.transcript  # where it is listed is not the client's business

    accepted = send(swaks, gateway, "friend@other.test", "allowed-1")
    assert accepted.returncode == 0, accepted.transcript
    exception = send(swaks, gateway, "boss@usa.test", "allowed-boss")  # allow_senders beats the domain
    assert exception.returncode == 0, exception.transcript
    wait_until(lambda: delivered(gateway, "allowed-1") and delivered(gateway, "allowed-boss"))
    assert not delivered(gateway, "blocked-1")
    gateway.wait_for_log("sender domain usa.test is blocked")
    # the hits are counted, across the SMTP workers (each reports every 5 s)
    wait_until(lambda: "reject 1" in filter_line(gateway), timeout=15)
    assert filter_line(gateway).startswith("filter lists: ")
    assert "accept 1" in filter_line(gateway)  # boss@usa.test, allowed


def filter_line(gateway: GatewayProcess) -> str:
    lines = gateway.ctl("status").stdout.splitlines()
    return next((line for line in lines if line.startswith("filter lists:")), "")


def test_blocked_client_is_refused_instead_of_the_banner(gateway: GatewayProcess, swaks: Any) -> None:
    refused = send(swaks, gateway, "friend@other.test", "client-1", client="127.0.0.3")
    assert "554 5.7.1 Access denied: client 127.0.0.3 is blocked" in refused.transcript
    assert "220 " not in refused.transcript
    assert refused.returncode != 0


def test_mailgatectl_reload_and_sighup_apply_the_edited_file_without_a_restart(
    gateway: GatewayProcess, swaks: Any
) -> None:
    pid = gateway.process.pid if gateway.process else 0
    assert send(swaks, gateway, "news@other.test", "before").returncode == 0

    # a new entry, by mailgatectl reload: the main process and every worker read it
    write_list(gateway.directory, "@usa.test\n@other.test   # added\n")
    result = gateway.ctl("reload")
    assert result.stdout.strip() == f"reloaded lists; SIGHUP sent to {WORKERS} SMTP worker process(es)"
    wait_until(lambda: reloads_seen(gateway) == 1 + WORKERS)
    for attempt in range(WORKERS + 1):  # new connections land on either worker
        refused = send(swaks, gateway, "news@other.test", f"after-reload-{attempt}")
        assert "554 5.7.1 Access denied: sender domain other.test is blocked" in refused.transcript

    # a bad line: mailgatectl names the file and the line, and the old lists stay in force
    write_list(gateway.directory, "@other.test\n\nnot an entry\n")
    failed = gateway.ctl("reload", check=False)
    assert failed.returncode == 1
    assert "block-senders.txt, line 3: one entry per line, not 'not an entry'" in failed.stderr
    assert "kept its old data" in failed.stderr
    wait_until(lambda: gateway.log().count("reload failed, the old data is kept") == 1 + WORKERS)
    assert "Traceback" not in gateway.log()
    for attempt in range(WORKERS + 1):
        still = send(swaks, gateway, "promo@usa.test", f"still-blocked-{attempt}")
        assert "sender domain usa.test is blocked" in still.transcript

    # fixed, and SIGHUP to the main process instead of mailgatectl: usa.test is let through
    write_list(gateway.directory, "@other.test\n")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: reloads_seen(gateway) == 2 * (1 + WORKERS))
    for attempt in range(WORKERS + 1):
        assert send(swaks, gateway, "promo@usa.test", f"after-sighup-{attempt}").returncode == 0
    wait_until(lambda: all(delivered(gateway, f"after-sighup-{n}") for n in range(WORKERS + 1)))
    assert gateway.process is not None and gateway.process.poll() is None  # SIGHUP did not stop it
    assert gateway.ctl("status").stdout.startswith(f"mailgate is running (pid {pid}")


def test_a_bad_list_file_stops_the_start_with_its_file_and_line(tmp_path: os.PathLike[str]) -> None:
    tmp = str(tmp_path)
    os.mkdir(os.path.join(tmp, "lists"))
    write_list(tmp, "@usa.test\n192.0.2.1 # a client, in the senders' list\n")
    path = os.path.join(tmp, "mailgate.toml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(gateway_config(tmp, free_port(), workers=WORKERS, extra=LISTS))
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "mailgate", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{tmp}/lists/block-senders.txt, line 2: '192.0.2.1' is not an address or a domain" in output
    assert "Traceback" not in output
