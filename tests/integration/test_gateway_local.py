"""The real gateway process, with swaks and smtplib as clients, delivering to Maildirs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.integration.gateway import (
    ROOT,
    TWISTD,
    GatewayProcess,
    free_port,
    gateway_config,
    mail_of,
    maildir_messages,
    running_gateway,
    wait_until,
)
from tests.integration.peers import require_program, require_root, swaks

pytestmark = pytest.mark.integration

USER, PASSWORD = "exchange", "s3cret-relay-pass"


@pytest.fixture
def gateway(tmp_path: os.PathLike[str]) -> Iterator[GatewayProcess]:
    require_program("swaks")
    tmp = str(tmp_path)
    from gateway.smtp.auth import hash_password

    with open(os.path.join(tmp, "users"), "w") as handle:
        handle.write(f"{USER}:{hash_password(PASSWORD)}\n")
    with running_gateway(tmp, credentials_file=f"{tmp}/users") as process:
        yield process


def test_swaks_over_starttls_to_our_domain_lands_in_the_maildir(gateway: GatewayProcess) -> None:
    result = swaks(
        "--server",
        f"127.0.0.1:{gateway.smtp_port}",
        "--to",
        "bob@example.com",
        "--tls",
        "--header",
        "Message-Id: <tls-1@client.test>",
    )
    assert result.returncode == 0, result.transcript
    assert "250 2.0.0 Ok: queued as" in result.transcript
    wait_until(lambda: mail_of(gateway, "bob@example.com"))
    [message] = mail_of(gateway, "bob@example.com")
    assert message["Message-Id"] == "<tls-1@client.test>"
    assert "by gw.test with ESMTPS" in message["Received"]
    assert message["Delivered-To"] == "bob@example.com"


def test_outsider_cannot_relay(gateway: GatewayProcess) -> None:
    # 127.0.0.2 is not in relay.networks: an Internet client
    result = swaks(
        "--server",
        f"127.0.0.1:{gateway.smtp_port}",
        "--local-interface",
        "127.0.0.2",
        "--to",
        "victim@elsewhere.test",
        "--quit-after",
        "RCPT",
    )
    assert "554 5.7.1 <victim@elsewhere.test>: Relay access denied" in result.transcript
    assert result.returncode != 0
    text = gateway.wait_for_log("Relay access denied")
    assert "victim@elsewhere.test" in text
    assert not os.path.exists(os.path.join(gateway.directory, "mail", "elsewhere.test"))


def test_auth_is_not_offered_before_tls_and_relays_after_it(gateway: GatewayProcess) -> None:
    plain = swaks(
        "--server",
        f"127.0.0.1:{gateway.smtp_port}",
        "--local-interface",
        "127.0.0.2",
        "--to",
        "x@elsewhere.test",
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    )
    assert plain.returncode != 0
    assert "AUTH" not in [
        line.split()[1].split("-")[0] for line in plain.transcript.splitlines() if line.startswith("<-  250")
    ]
    wrong = swaks(
        "--server",
        f"127.0.0.1:{gateway.smtp_port}",
        "--local-interface",
        "127.0.0.2",
        "--tls",
        "--to",
        "x@elsewhere.test",
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        "nope",
    )
    assert "535 5.7.8" in wrong.transcript
    good = swaks(
        "--server",
        f"127.0.0.1:{gateway.smtp_port}",
        "--local-interface",
        "127.0.0.2",
        "--tls",
        "--to",
        "x@elsewhere.test",
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    )
    assert good.returncode == 0, good.transcript
    assert "235 2.7.0" in good.transcript
    wait_until(lambda: mail_of(gateway, "x@elsewhere.test"))
    assert "ESMTPSA" in mail_of(gateway, "x@elsewhere.test")[0]["Received"]


def test_swaks_pipelining_chunking_and_smtputf8(gateway: GatewayProcess) -> None:
    pipelined = swaks(
        "--server", f"127.0.0.1:{gateway.smtp_port}", "--pipeline", "--to", "p1@example.com,p2@example.com"
    )
    assert pipelined.returncode == 0, pipelined.transcript
    chunked = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{gateway.smtp_port}",
            "--to",
            "c@example.com",
            "--protocol",
            "ESMTP",
            "--quit-after",
            "EHLO",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "CHUNKING" in chunked.stdout and "SMTPUTF8" in chunked.stdout and "PIPELINING" in chunked.stdout
    # BDAT with an internationalised address, on a raw socket
    body = "Subject: Grüße\r\nMessage-Id: <utf8@client.test>\r\n\r\nhallo\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as conn:
        replies = conn.makefile("rb")
        conn.sendall(
            b"EHLO client.test\r\nMAIL FROM:<j\xc3\xb6rg@example.com> SMTPUTF8 BODY=8BITMIME\r\n"
            + "RCPT TO:<ü@example.com>\r\n".encode()
            + f"BDAT {len(body)} LAST\r\n".encode()
            + body
            + b"QUIT\r\n"
        )
        answers = [line for line in replies.read().split(b"\r\n") if line and not line.startswith(b"250-")]
    assert [a[:3] for a in answers] == [b"220", b"250", b"250", b"250", b"250", b"221"], answers
    wait_until(lambda: mail_of(gateway, "ü@example.com"))
    assert mail_of(gateway, "ü@example.com")[0]["Message-Id"] == "<utf8@client.test>"
    wait_until(
        lambda: len(mail_of(gateway, "p1@example.com")) == 1 and len(mail_of(gateway, "p2@example.com")) == 1
    )


def test_mailgatectl_status_and_empty_queue(gateway: GatewayProcess) -> None:
    status = gateway.ctl("status")
    assert "mailgate is running" in status.stdout
    assert gateway.ctl("queue", "list").stdout.strip() == "Mail queue is empty"


def test_bad_config_stops_start_with_file_line_and_key(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.toml")
    with open(path, "w") as handle:
        handle.write('[gateway]\nstate_dir = "x"\n\n[smtp]\nmax_recipients = "lots"\n')

    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "mailgate", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode != 0
    assert (
        f"{path}, line 5: smtp.max_recipients: must be an integer, not a string"
        in result.stdout + result.stderr
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_started_as_root_it_runs_as_the_configured_user(tmp_path: os.PathLike[str]) -> None:
    require_root()
    tmp = tempfile.mkdtemp(dir="/tmp")  # /tmp is enterable by nobody; pytest's tmp_path is not
    os.chmod(tmp, 0o755)
    os.mkdir(os.path.join(tmp, "mail"))
    os.chown(os.path.join(tmp, "mail"), 65534, 65534)  # the Maildirs are the user's to write
    port = free_port()  # no credentials_file: the user could not read it
    process = GatewayProcess(tmp, gateway_config(tmp, port, user="nobody"), port)
    process.start()
    try:
        with open(f"/proc/{process.process.pid}/status") as status:  # type: ignore[union-attr]
            uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"65534"}
        result = swaks("--server", f"127.0.0.1:{port}", "--to", "drop@example.com")
        assert result.returncode == 0, result.transcript
        wait_until(lambda: maildir_messages(os.path.join(tmp, "mail", "example.com", "drop")))
    finally:
        process.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_unreachable_state_dir_for_the_user_is_one_clear_error(tmp_path: os.PathLike[str]) -> None:
    require_root()
    tmp = str(tmp_path)  # under /tmp/pytest-of-root, mode 0700: nobody cannot enter it
    port = free_port()  # no credentials_file: the user could not read it
    process = GatewayProcess(tmp, gateway_config(tmp, port, user="nobody"), port)
    with pytest.raises(RuntimeError):
        process.start(timeout=15)
    assert "gateway.user nobody cannot reach gateway.state_dir" in process.log()
