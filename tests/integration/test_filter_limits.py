"""Connection limits shared by the SMTP worker processes, an early talker and an AUTH
lockout, against the real gateway (twistd) with ``smtp.workers = 2``.

Sessions are raw sockets from loopback addresses (127.0.0.0/8 is all ours on
Linux), so each test can play a different client.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.gateway import GatewayProcess, running_gateway, wait_until

USER, PASSWORD = "alice", "alice-pass-1"
PER_IP = 3


FILTERS = f"""
[filters]
inbound = ["limits", "protocol"]
[filters.limits]
max_connections_per_ip = {PER_IP}
max_connection_rate = 1000
auth_delay = "0s"
[filters.protocol]
greet_wait = "0.5s"
"""


@pytest.fixture
def gateway(tmp_path: os.PathLike[str]) -> Iterator[GatewayProcess]:
    from gateway.smtp.auth import hash_password

    tmp = str(tmp_path)
    with open(os.path.join(tmp, "users"), "w") as handle:
        handle.write(f"{USER}:{hash_password(PASSWORD)}\n")
    with running_gateway(
        tmp,
        workers=2,
        smtp="auth_requires_tls = false",
        credentials_file=f"{tmp}/users",
        domains=["internal.test"],
        networks=["192.0.2.0/24"],
        route=None,
        queue_scan_interval=None,
        extra=FILTERS,
    ) as process:
        # start() polled the banner from 127.0.0.1: let those sessions end first
        wait_until(lambda: _opened(process, "127.0.0.1") == _closed(process, "127.0.0.1"))
        time.sleep(0.3)  # and their ends reach the anvil
        yield process


def _opened(gateway: GatewayProcess, host: str) -> int:
    return gateway.log().count(f"connect from [{host}]:") - _closed(gateway, host)


def _closed(gateway: GatewayProcess, host: str) -> int:
    return gateway.log().count(f"disconnect from [{host}]:")


class Session:
    """A raw SMTP client socket from a chosen loopback address."""

    def __init__(self, gateway: GatewayProcess, source: str) -> None:
        self.gateway = gateway
        self.source = source
        self.socket = socket.create_connection(
            ("127.0.0.1", gateway.smtp_port), timeout=15, source_address=(source, 0)
        )
        self.port = self.socket.getsockname()[1]
        self._buffer = b""

    def send(self, line: str) -> None:
        self.socket.sendall(line.encode() + b"\r\n")

    def reply(self) -> str:
        """One whole reply (all its lines), as text."""
        lines = []
        while True:
            while b"\r\n" not in self._buffer:
                chunk = self.socket.recv(4096)
                if not chunk:
                    raise AssertionError(f"connection closed; got {lines!r} {self._buffer!r}")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def ask(self, line: str) -> str:
        self.send(line)
        return self.reply()

    def worker(self) -> int:
        """Which SMTP worker process serves this session (from the gateway's log)."""
        needle = re.compile(
            rf"\[mailgate\.smtpd\.(\d+)#\w+\] smtpd: connect from \[{self.source}\]:{self.port}\b"
        )
        found: list[int] = []

        def logged() -> bool:
            match = needle.search(self.gateway.log())
            if match:
                found.append(int(match.group(1)))
            return bool(match)

        wait_until(logged, timeout=10)
        return found[0]

    def quit(self) -> None:
        assert self.ask("QUIT").startswith("221")
        self.close()
        wait_until(lambda: f"disconnect from [{self.source}]:{self.port} " in self.gateway.log())
        time.sleep(0.3)  # the worker tells the anvil just after it logs

    def close(self) -> None:
        self.socket.close()


def test_the_per_address_limit_counts_the_sessions_of_both_workers(gateway: GatewayProcess) -> None:
    first, second = sorted(gateway.worker_pids())
    held: list[tuple[Session, int]] = []
    for worker in (first,) * (PER_IP - 1) + (second,):
        with gateway.only_worker(worker):
            session = Session(gateway, "127.0.0.1")
            assert session.reply().startswith("220 gw.test")
        assert session.worker() == worker
        held.append((session, worker))
    fourth = Session(gateway, "127.0.0.1")
    # whichever worker took it holds at most two of the three: only a shared count refuses it
    assert fourth.reply() == "421 4.7.0 Error: too many connections from [127.0.0.1], try again later"
    assert fourth.socket.recv(100) == b""  # and closed
    other = Session(gateway, "127.0.0.2")
    assert other.reply().startswith("220 gw.test")
    assert other.ask("EHLO client.test").startswith("250-gw.test")
    held[0][0].quit()  # one of the three goes: the address may connect again
    again = Session(gateway, "127.0.0.1")
    assert again.reply().startswith("220 gw.test")
    for session in (other, again, *(s for s, _ in held[1:])):
        session.close()


def test_an_early_talker_is_refused(gateway: GatewayProcess) -> None:
    talker = Session(gateway, "127.0.0.3")
    talker.send("EHLO spam.example")  # before the banner, which waits half a second
    assert talker.reply().startswith("220 gw.test")
    assert talker.reply() == "554 5.5.1 Protocol error: talked before the greeting"
    assert talker.ask("MAIL FROM:<a@example.org>").startswith("503")
    talker.close()


def test_auth_failures_on_both_workers_lock_the_address_out(gateway: GatewayProcess) -> None:
    import base64

    def attempt(session: Session, password: str) -> str:
        token = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
        return session.ask(f"AUTH PLAIN {token}")

    # five failures over two sessions, one on each worker
    for worker, tries in zip(sorted(gateway.worker_pids()), (3, 2), strict=True):
        with gateway.only_worker(worker):
            session = Session(gateway, "127.0.0.4")
            assert session.reply().startswith("220")
        assert session.worker() == worker
        assert session.ask("EHLO client.test").startswith("250")
        for _ in range(tries):
            assert attempt(session, "wrong").startswith("535 5.7.8")
        session.close()
    locked = Session(gateway, "127.0.0.4")
    assert locked.reply().startswith("220")
    locked.ask("EHLO client.test")
    assert (
        attempt(locked, PASSWORD)
        == "454 4.7.0 Error: too many AUTH failures from [127.0.0.4], try again later"
    )
    locked.close()
    elsewhere = Session(gateway, "127.0.0.5")  # another address still may
    assert elsewhere.reply().startswith("220")
    elsewhere.ask("EHLO client.test")
    assert attempt(elsewhere, PASSWORD).startswith("235")
    elsewhere.close()
    gateway.wait_for_log("[127.0.0.4] locked out of AUTH")
