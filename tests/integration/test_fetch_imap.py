"""The IMAP client against a real Dovecot (peer_dovecot_mail.DovecotMail) on loopback.

IMAPS and IMAP with STARTTLS, the certificate checked against the peer's
throwaway CA for the name "localhost": list, retrieve (BODY.PEEK[]: nothing
marked seen), delete and close (gone) or abort (kept, not even flagged), the
UIDVALIDITY in every uid, a folder with a non-ASCII name, MOVE, IDLE seeing a
delivery within seconds, a wrong password and a certificate for another name.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from gateway.fetch import AuthenticationFailed, MailboxAccount, RemoteMessage, TlsRefused
from gateway.fetch.imap import ImapSession, connect_imap
from tests.integration.peer_dovecot_mail import DovecotMail
from tests.integration.peers import HOST, require_program, require_root
from tests.integration.turning import failure, wait

pytestmark = pytest.mark.integration

USERS = [f"user{number}" for number in range(1, 16)]


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotMail]:
    require_program("dovecot")
    require_program("doveadm")
    require_root()
    users = {user: f"{user}-{secrets.token_hex(6)}" for user in USERS}
    peer = DovecotMail(users=users)
    peer.start()
    # The client resolves the host in the reactor's thread pool (HostnameEndpoint), which only
    # starts with the reactor: these tests turn the reactor by hand, so start it here.
    pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    started = not pool.started
    if started:
        pool.start()
    try:
        yield peer
    finally:
        if started:
            pool.stop()
            # a stopped pool cannot start again: let the next user of the reactor make a new one
            reactor.threadpool = None  # type: ignore[attr-defined]
        peer.stop()


class Users:
    """Hands each test its own mailbox user of the shared Dovecot."""

    def __init__(self) -> None:
        self.free = list(USERS)

    def take(self) -> str:
        return self.free.pop(0)


_users = Users()


def account(dovecot: DovecotMail, user: str, mode: str = "implicit", **changes: Any) -> MailboxAccount:
    values: dict[str, Any] = {
        "host": HOST,
        "port": dovecot.imaps_port if mode == "implicit" else dovecot.imap_port,
        "username": user,
        "password": dovecot.password(user),
        "tls": mode,
        "ca_file": dovecot.ca_file,
        "tls_name": "localhost",
        "timeout": 20.0,
    }
    values.update(changes)
    return MailboxAccount(**values)


def message(number: int, size: int = 2000) -> bytes:
    """A message as an MDA stores it (LF line ends); IMAP gives it with CRLF."""
    head = f"From: sender{number}@example.net\nTo: someone@example.org\nSubject: message {number}\n"
    head += f"Message-ID: <{number}.{secrets.token_hex(4)}@example.net>\n\n"
    body = "".join(f"line {line} of message {number}\n" for line in range(size // 24))
    return (head + body).encode()


def crlf(content: bytes) -> bytes:
    return content.replace(b"\n", b"\r\n")


def retrieve(session: ImapSession, remote: RemoteMessage) -> tuple[bytes, int, int]:
    pieces: list[bytes] = []
    count = wait(session.retrieve(remote, pieces.append))
    return b"".join(pieces), count, len(pieces)


def uidvalidity(dovecot: DovecotMail, user: str, folder: str = "INBOX") -> int:
    output = dovecot.doveadm("mailbox", "status", "-u", user, "uidvalidity", folder)
    return int(output.strip().rpartition("=")[2])


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_list_retrieve_delete_and_close(dovecot: DovecotMail, mode: str) -> None:
    user = _users.take()
    contents = [message(number) for number in range(3)]
    for content in contents:
        dovecot.deliver(user, content)
    session: ImapSession = wait(connect_imap(account(dovecot, user, mode), reactor))
    assert {"UIDPLUS", "IDLE", "MOVE"} <= session.capabilities
    listed = wait(session.list_messages())
    validity = uidvalidity(dovecot, user)
    assert [remote.uid for remote in listed] == [f"{validity}:1", f"{validity}:2", f"{validity}:3"]
    assert [remote.size for remote in listed] == [len(crlf(content)) for content in contents]
    for remote, content in zip(listed, contents, strict=True):
        fetched, count, _pieces = retrieve(session, remote)
        assert fetched == crlf(content) and count == len(fetched)
    assert not any(stored.seen for stored in dovecot.messages(user)), "BODY.PEEK[] marks nothing seen"
    wait(session.delete([listed[0], listed[2]]))
    wait(session.close())
    left = dovecot.messages(user)
    assert [stored.content for stored in left] == [contents[1]]
    assert not left[0].deleted


def test_abort_keeps_everything_unflagged(dovecot: DovecotMail) -> None:
    user = _users.take()
    for number in range(2):
        dovecot.deliver(user, message(number))
    session: ImapSession = wait(connect_imap(account(dovecot, user), reactor))
    listed = wait(session.list_messages())
    retrieve(session, listed[0])
    wait(session.delete(listed))
    session.abort()
    wait(session.protocol.when_closed())
    stored = dovecot.messages(user)
    assert len(stored) == 2 and not any(entry.deleted for entry in stored)


def test_a_large_message_is_streamed_in_pieces(dovecot: DovecotMail) -> None:
    user = _users.take()
    content = message(1, size=5 * 1024 * 1024)
    dovecot.deliver(user, content)
    session: ImapSession = wait(connect_imap(account(dovecot, user), reactor))
    [remote] = wait(session.list_messages())
    fetched, count, pieces = retrieve(session, remote)
    assert fetched == crlf(content) and count == remote.size
    assert pieces > 10, "handed over as it arrived, not in one piece"
    wait(session.close())


def test_a_non_ascii_folder(dovecot: DovecotMail) -> None:
    user = _users.take()
    content = message(7)
    dovecot.deliver(user, content, folder="Entwürfe")  # Maildir++ directory ".Entw&APw-rfe"
    session: ImapSession = wait(connect_imap(account(dovecot, user, folder="Entwürfe"), reactor))
    [remote] = wait(session.list_messages())
    assert remote.uid == f"{uidvalidity(dovecot, user, 'Entwürfe')}:1"
    assert retrieve(session, remote)[0] == crlf(content)
    wait(session.delete([remote]))
    wait(session.close())
    assert dovecot.messages(user, "Entwürfe") == []


def test_move_to_a_folder_that_does_not_exist_yet(dovecot: DovecotMail) -> None:
    user = _users.take()
    content = message(3)
    dovecot.deliver(user, content)
    session: ImapSession = wait(connect_imap(account(dovecot, user), reactor))
    listed = wait(session.list_messages())
    wait(session.move(listed, "Abgeholt.Größe"))
    wait(session.close())
    assert dovecot.messages(user) == []
    assert [stored.content for stored in dovecot.messages(user, "Abgeholt.Größe")] == [content]


def test_idle_sees_a_new_message_within_seconds(dovecot: DovecotMail) -> None:
    user = _users.take()
    session: ImapSession = wait(connect_imap(account(dovecot, user), reactor))
    assert wait(session.list_messages()) == []
    arrived: Deferred[float] = Deferred()

    def on_change() -> None:
        if not arrived.called:
            arrived.callback(time.monotonic())

    idling = session.idle(on_change)
    wait(_later(0.5))  # in IDLE now
    content = message(9)
    delivered = time.monotonic()
    dovecot.deliver(user, content)
    seen = wait(arrived, timeout=20.0)
    assert seen - delivered < 5.0
    wait(session.done())
    assert wait(idling) is None
    [remote] = wait(session.list_messages())
    assert retrieve(session, remote)[0] == crlf(content)
    wait(session.close())


def _later(seconds: float) -> Deferred[None]:
    later: Deferred[None] = Deferred()
    reactor.callLater(seconds, later.callback, None)
    return later


def test_login_command_and_plain_text_when_the_account_says_none(dovecot: DovecotMail) -> None:
    user = _users.take()
    dovecot.deliver(user, message(1))
    session: ImapSession = wait(connect_imap(account(dovecot, user, "none", auth="login"), reactor))
    assert len(wait(session.list_messages())) == 1
    wait(session.close())


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_a_certificate_for_another_name_is_refused(dovecot: DovecotMail, mode: str) -> None:
    user = _users.take()
    elsewhere = account(dovecot, user, mode, tls_name="imap.example.org")
    error = failure(connect_imap(elsewhere, reactor))
    assert isinstance(error, TlsRefused)
    with open(dovecot.log_path, encoding="utf-8", errors="replace") as log_file:
        log = log_file.read()
    assert f"user=<{user}>" not in log, "no login was attempted"


# Last: Dovecot delays further logins from an address after failed ones (its auth penalty).
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_a_wrong_password_is_authentication_failed(dovecot: DovecotMail, mode: str) -> None:
    user = _users.take()
    wrong = account(dovecot, user, mode, password="not-the-password")
    error = failure(connect_imap(wrong, reactor))
    assert isinstance(error, AuthenticationFailed)
    assert "not-the-password" not in str(error)
