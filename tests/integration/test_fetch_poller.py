"""The poller against a real Dovecot, into a real spool, through the real reception.

A `FetchService` with the real POP3 and IMAP clients, a `Reception` over a
`DirectorySpool` and a `SqliteStore` in a temporary directory, on the real
reactor (run by `wait`): POP3S single-drop deleting on the server, IMAP with
STARTTLS keeping mail in two folders (nothing fetched twice after a restart,
nothing marked seen), a multidrop mailbox delivering to two users and an
unknown one to the postmaster with a duplicate suppressed, and a wrong
password counted and alerted.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.logger import formatEvent

from gateway.config import RelayConfig
from gateway.fetch import poller as poller_module
from gateway.fetch.accounts import FetchAccount, FetchConfig, MultidropConfig
from gateway.fetch.poller import FetchService
from gateway.queue import open_message
from gateway.queue.spool import DirectorySpool
from gateway.reception import Reception
from gateway.state.sqlite import SqliteStore
from tests.integration.peer_dovecot_mail import DovecotMail
from tests.integration.peers import HOST, require_program, require_root
from tests.integration.turning import wait

pytestmark = pytest.mark.integration

USERS = ("single", "kept", "public", "wrong")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotMail]:
    require_program("dovecot")
    require_program("doveconf")
    require_root()
    peer = DovecotMail(users={user: f"{user}-{secrets.token_hex(6)}" for user in USERS})
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


class Gateway:
    """A spool, a state store and a reception in `directory`; FetchServices over them."""

    def __init__(self, directory: Path, dovecot: DovecotMail, *accounts: FetchAccount) -> None:
        self.directory = directory
        self.spool = DirectorySpool(str(directory / "spool"), reactor=reactor)  # type: ignore[arg-type]
        self.spool.recover_now()
        self.store = SqliteStore(str(directory / "state.sqlite"), reactor)
        self.reception = Reception(self.spool, RelayConfig(domains=("corp.test",)))
        self.config = FetchConfig(accounts=accounts)
        self.service = self.restart()

    def restart(self) -> FetchService:
        """A new FetchService on the same spool and store (what a restart of the gateway keeps)."""
        self.service = FetchService(
            self.config,
            self.reception,
            self.store,
            reactor,
            hostname="gw.corp.test",
            postmaster="postmaster@corp.test",
        )
        return self.service

    def poll(self, name: str) -> dict[str, Any]:
        [result] = wait(self.service.poll_now(name))
        assert isinstance(result, dict)
        return result

    def queued(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(sender, recipients, content) of every queued message."""
        found = []
        for queue_id in sorted(self.spool.list("incoming")):
            message = self.spool.load(queue_id)
            with open_message(self.spool.message_path(queue_id)) as handle:
                content = handle.read()
            recipients = tuple(r.recipient.address for r in message.recipients)
            found.append((message.envelope.mail_from, recipients, content))
        return found

    def close(self) -> None:
        wait(self.store.close())
        wait(self.spool.stop())


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    made: list[Gateway] = []
    yield made
    for gateway in made:
        gateway.close()


def account(
    dovecot: DovecotMail, tmp_path: Path, user: str, protocol: str, tls: str, **changes: Any
) -> FetchAccount:
    ports = {
        ("pop3", "implicit"): dovecot.pop3s_port,
        ("pop3", "starttls"): dovecot.pop3_port,
        ("imap", "implicit"): dovecot.imaps_port,
        ("imap", "starttls"): dovecot.imap_port,
    }
    password_file = tmp_path / f"{user}.pass"
    password_file.write_text(dovecot.password(user) + "\n")
    os.chmod(password_file, 0o600)
    values: dict[str, Any] = {
        "name": user,
        "protocol": protocol,
        "server": HOST,
        "port": ports[protocol, tls],
        "username": user,
        "password_file": str(password_file),
        "password": dovecot.password(user),
        "tls": tls,
        "ca_file": dovecot.ca_file,
        "tls_name": "localhost",
        "timeout": 20.0,
        "deliver_to": (f"{user}@corp.test",),
    }
    values.update(changes)
    return FetchAccount(**values)


def message(number: int, headers: bytes = b"") -> bytes:
    return (
        b"Return-Path: <sender%d@partner.example>\r\n" % number
        + headers
        + b"From: sender%d@partner.example\r\nMessage-ID: <%d.%s@partner.example>\r\n"
        b"Subject: test %d\r\n\r\nLine one.\r\n.A line that starts with a dot\r\n"
        % (number, number, secrets.token_hex(4).encode(), number)
    )


def body(content: bytes) -> bytes:
    """A queued message without our Received header (its first two lines)."""
    return content.split(b"\r\n", 2)[2]


def test_pop3s_single_drop_queues_each_message_once_and_deletes_it_on_the_server(
    dovecot: DovecotMail, tmp_path: Path, gateways: list[Gateway]
) -> None:
    sent = [message(number) for number in range(3)]
    for content in sent:
        dovecot.deliver("single", content)
    gateway = Gateway(tmp_path, dovecot, account(dovecot, tmp_path, "single", "pop3", "implicit"))
    gateways.append(gateway)
    result = gateway.poll("single")
    assert (result["messages"], result["deleted"], result["error"]) == (3, 3, None)
    queued = gateway.queued()
    assert sorted(body(content) for _s, _r, content in queued) == sorted(sent)
    assert {(sender, recipients) for sender, recipients, _c in queued} == {
        (f"sender{n}@partner.example", ("single@corp.test",)) for n in range(3)
    }
    assert queued[0][2].startswith(
        b"Received: from 127.0.0.1 by gw.corp.test with POP3 (MailGate account single)"
    )
    assert dovecot.messages("single") == []
    dovecot.deliver("single", message(9))
    gateway.restart()
    assert gateway.poll("single")["messages"] == 1
    assert len(gateway.queued()) == 4 and dovecot.messages("single") == []


def test_imap_keep_fetches_two_folders_once_across_a_restart_and_marks_nothing_seen(
    dovecot: DovecotMail, tmp_path: Path, gateways: list[Gateway]
) -> None:
    dovecot.deliver("kept", message(1))
    dovecot.deliver("kept", message(2), folder="Archiv")
    kept = account(dovecot, tmp_path, "kept", "imap", "starttls", keep=True, folders=("INBOX", "Archiv"))
    gateway = Gateway(tmp_path, dovecot, kept)
    gateways.append(gateway)
    assert gateway.poll("kept")["messages"] == 2
    assert gateway.poll("kept")["messages"] == 0
    gateway.restart()  # the seen UIDs come back from the state store
    dovecot.deliver("kept", message(3), folder="Archiv")
    result = gateway.poll("kept")
    assert (result["messages"], result["deleted"], result["error"]) == (1, 0, None)
    assert len(gateway.queued()) == 3
    stored = dovecot.messages("kept") + dovecot.messages("kept", "Archiv")
    assert len(stored) == 3 and not any(entry.seen or entry.deleted for entry in stored)
    assert all(
        content.startswith(b"Received: from 127.0.0.1 by gw.corp.test with IMAP (MailGate account kept)")
        for _s, _r, content in gateway.queued()
    )


def test_multidrop_delivers_to_two_users_and_an_unknown_one_to_the_postmaster(
    dovecot: DovecotMail, tmp_path: Path, gateways: list[Gateway]
) -> None:
    both = message(2, b"Delivered-To: alice@corp.example\r\n")
    dovecot.deliver("public", message(1, b"Delivered-To: bob@corp.example\r\n"))
    dovecot.deliver("public", both)
    dovecot.deliver("public", both.replace(b"alice@corp.example", b"bob@corp.example"))  # same Message-ID
    dovecot.deliver("public", both)  # the provider delivered it twice to alice: a duplicate
    dovecot.deliver("public", message(3, b"X-Original-To: mallory@corp.example\r\n"))
    public = account(
        dovecot,
        tmp_path,
        "public",
        "pop3",
        "starttls",
        deliver_to=(),
        multidrop=MultidropConfig(
            local_domains=("corp.example",),
            local_parts=(("alice", "alice@corp.test"), ("bob", "bob@corp.test")),
        ),
    )
    gateway = Gateway(tmp_path, dovecot, public)
    gateways.append(gateway)
    result = gateway.poll("public")
    assert (result["messages"], result["deleted"], result["error"]) == (5, 5, None)
    routed = sorted(
        (content.count(b"Subject: test 2"), recipients) for _s, recipients, content in gateway.queued()
    )
    assert [recipients for _copies, recipients in routed] == [
        ("bob@corp.test",),  # message 1
        ("postmaster@corp.test",),  # message 3, for mallory
        ("alice@corp.test",),  # message 2, once (the duplicate suppressed)
        ("bob@corp.test",),  # message 2's other copy
    ]
    assert dovecot.messages("public") == []


def test_a_wrong_password_is_counted_and_alerted_after_three_polls(
    dovecot: DovecotMail, tmp_path: Path, gateways: list[Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    monkeypatch.setattr(poller_module.log, "observer", lambda event: lines.append(formatEvent(event)))
    dovecot.deliver("wrong", message(1))
    wrong = account(
        dovecot, tmp_path, "wrong", "imap", "implicit", password="not-" + dovecot.password("wrong")
    )
    gateway = Gateway(tmp_path, dovecot, wrong)
    gateways.append(gateway)
    for _ in range(3):
        assert "refused the login of wrong" in gateway.poll("wrong")["error"]
    assert [line for line in lines if "ALERT" in line] == [
        "fetch: ALERT: account wrong: authentication failed 3 times"
    ]
    assert gateway.service.status()["wrong"]["errors"] == 3
    assert dovecot.password("wrong") not in "".join(lines)
    assert gateway.queued() == [] and len(dovecot.messages("wrong")) == 1
