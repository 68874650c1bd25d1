"""The poller with the real POP2 client against a scripted POP2 server, into a real spool.

Debian 12 packages no POP2 server (UW's ipop2d went with uw-imap), so this test
runs a small RFC 937 server of its own on 127.0.0.1: HELO, FOLD, READ, RETR,
ACKS, ACKD, NACK and QUIT over a list of messages, deleting what was ACKD'ed
at QUIT. Around it everything is real, in the shape of test_fetch_poller.py:
a `FetchService` on the real reactor, a `Reception` over a `DirectorySpool`
and a `SqliteStore` in a temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.protocol import Protocol, ServerFactory

from gateway.config import RelayConfig
from gateway.fetch.accounts import FetchAccount, FetchConfig
from gateway.fetch.poller import FetchService
from gateway.queue import open_message
from gateway.queue.spool import DirectorySpool
from gateway.reception import Reception
from gateway.state.sqlite import SqliteStore
from tests.integration.peers import HOST
from tests.integration.test_fetch_poller import body, message
from tests.integration.turning import wait

pytestmark = pytest.mark.integration

PASSWORD = "pop2-Secret"


class Pop2Mailbox:
    """What the scripted server serves: messages, and the commands it was sent (HELO's password hidden)."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = list(messages)
        self.commands: list[str] = []


class ScriptedPop2(Protocol):
    """RFC 937's server side, just enough: one mailbox, deletions done at QUIT."""

    def __init__(self, mailbox: Pop2Mailbox) -> None:
        self.mailbox = mailbox
        self.buffer = b""
        self.current = 0
        self.retrieved = False
        self.deleted: set[int] = set()

    def connectionMade(self) -> None:
        self.reply(b"+ POP2 scripted server ready")

    def reply(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")

    def length(self, number: int) -> bytes:
        present = 1 <= number <= len(self.mailbox.messages) and number not in self.deleted
        return b"=%d" % (len(self.mailbox.messages[number - 1]) if present else 0)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.command(line.decode())

    def command(self, line: str) -> None:
        verb, _, argument = line.partition(" ")
        self.mailbox.commands.append("HELO" if verb == "HELO" else line)
        if verb == "HELO":
            ok = argument == f"user {PASSWORD}"
            self.reply(b"#%d" % len(self.mailbox.messages) if ok else b"- wrong password")
        elif verb == "READ":
            self.current, self.retrieved = int(argument), False
            self.reply(self.length(self.current))
        elif verb == "RETR":
            assert self.transport is not None
            self.transport.write(self.mailbox.messages[self.current - 1])
            self.retrieved = True
        elif verb in ("ACKS", "ACKD", "NACK") and self.retrieved:
            self.retrieved = False
            if verb == "ACKD":
                self.deleted.add(self.current)
            if verb != "NACK":
                self.current += 1
            self.reply(self.length(self.current))
        elif verb == "QUIT":
            self.mailbox.messages = [
                content
                for number, content in enumerate(self.mailbox.messages, 1)
                if number not in self.deleted
            ]
            self.reply(b"+ bye")
            assert self.transport is not None
            self.transport.loseConnection()
        else:
            self.reply(b"- not now")


@pytest.fixture
def server() -> Iterator[tuple[Pop2Mailbox, int]]:
    mailbox = Pop2Mailbox([])
    factory = ServerFactory()
    factory.protocol = lambda: ScriptedPop2(mailbox)
    port: Any = reactor.listenTCP(0, factory, interface=HOST)
    try:
        yield mailbox, port.getHost().port
    finally:
        wait(port.stopListening())


class Gateway:
    def __init__(self, directory: Path, account: FetchAccount) -> None:
        self.spool = DirectorySpool(str(directory / "spool"), reactor=reactor)  # type: ignore[arg-type]
        self.spool.recover_now()
        self.store = SqliteStore(str(directory / "state.sqlite"), reactor)
        self.reception = Reception(self.spool, RelayConfig(domains=("corp.test",)))
        self.config = FetchConfig(accounts=(account,))
        self.service = self.restart()

    def restart(self) -> FetchService:
        self.service = FetchService(
            self.config,
            self.reception,
            self.store,
            reactor,
            hostname="gw.corp.test",
            postmaster="pm@corp.test",
        )
        return self.service

    def poll(self) -> dict[str, Any]:
        [result] = wait(self.service.poll_now("old"))
        assert isinstance(result, dict)
        return result

    def queued(self) -> list[bytes]:
        found = []
        for queue_id in sorted(self.spool.list("incoming")):
            with open_message(self.spool.message_path(queue_id)) as handle:
                found.append(handle.read())
        return found

    def close(self) -> None:
        wait(self.store.close())
        wait(self.spool.stop())


def account(tmp_path: Path, port: int, **changes: Any) -> FetchAccount:
    password_file = tmp_path / "pop2.pass"
    password_file.write_text(PASSWORD + "\n")
    os.chmod(password_file, 0o600)
    values: dict[str, Any] = {
        "name": "old",
        "protocol": "pop2",
        "server": HOST,
        "port": port,
        "username": "user",
        "password_file": str(password_file),
        "password": PASSWORD,
        "tls": "none",
        "timeout": 20.0,
        "deliver_to": ("old@corp.test",),
    }
    values.update(changes)
    return FetchAccount(**values)


def test_pop2_deleting_queues_each_message_once_and_deletes_it_after_queuing(
    server: tuple[Pop2Mailbox, int], tmp_path: Path
) -> None:
    mailbox, port = server
    sent = [message(number) for number in range(3)]
    mailbox.messages = list(sent)
    gateway = Gateway(tmp_path, account(tmp_path, port))
    try:
        result = gateway.poll()
        assert (result["messages"], result["deleted"], result["error"]) == (3, 3, None)
        queued = gateway.queued()
        assert sorted(body(content) for content in queued) == sorted(sent)
        assert queued[0].startswith(
            b"Received: from 127.0.0.1 by gw.corp.test with POP2 (MailGate account old)"
        )
        assert mailbox.messages == []
        # Each message ACKD'ed right after its own RETR (no second reading to delete it).
        assert mailbox.commands.count("ACKD") == 3 and mailbox.commands.count("RETR") == 6
        assert PASSWORD not in " ".join(mailbox.commands)
        mailbox.messages.append(message(9))
        gateway.restart()
        assert gateway.poll()["messages"] == 1
        assert len(gateway.queued()) == 4 and mailbox.messages == []
    finally:
        gateway.close()


def test_pop2_keep_fetches_nothing_twice_across_a_restart(
    server: tuple[Pop2Mailbox, int], tmp_path: Path
) -> None:
    mailbox, port = server
    mailbox.messages = [message(1), message(2)]
    gateway = Gateway(tmp_path, account(tmp_path, port, keep=True))
    try:
        assert gateway.poll()["messages"] == 2
        gateway.restart()
        mailbox.messages.append(message(3))
        result = gateway.poll()
        assert (result["messages"], result["deleted"], result["error"]) == (1, 0, None)
        assert len(gateway.queued()) == 3 and len(mailbox.messages) == 3
        assert "ACKD" not in mailbox.commands
    finally:
        gateway.close()


def test_pop2_wrong_password_leaves_everything(server: tuple[Pop2Mailbox, int], tmp_path: Path) -> None:
    mailbox, port = server
    mailbox.messages = [message(1)]
    gateway = Gateway(tmp_path, account(tmp_path, port, password="wrong"))
    try:
        result = gateway.poll()
        assert result["messages"] == 0 and "refused the login" in result["error"]
        assert gateway.queued() == [] and len(mailbox.messages) == 1
    finally:
        gateway.close()
