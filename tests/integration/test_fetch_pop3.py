"""The POP3 client against a real Dovecot (peer_dovecot_mail.DovecotMail) on loopback.

POP3S and POP3 with STLS, the certificate checked against the peer's throwaway CA for the
name "localhost": list, retrieve (byte for byte, dot-stuffed lines back as they were),
delete and close (gone), delete and abort (kept), stable UIDL across sessions, pipelined
retrieval, a 1 MB message streamed in pieces, APOP, a wrong password, a certificate for
another name and one from an unknown CA.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import reactor

from gateway.fetch import AuthenticationFailed, FetchError, MailboxAccount, RemoteMessage, TlsRefused
from gateway.fetch.pop3 import Pop3Session, connect_pop3
from tests.integration.peer_dovecot_mail import DovecotMail
from tests.integration.peers import HOST, require_program, require_root
from tests.integration.turning import failure, wait

pytestmark = pytest.mark.integration

USERS = [f"pop{number}" for number in range(1, 21)]


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


_free = list(USERS)


@pytest.fixture
def user() -> str:
    """A mailbox user of the shared Dovecot for this test alone."""
    return _free.pop(0)


def account(dovecot: DovecotMail, user: str, tls: str = "implicit", **changes: Any) -> MailboxAccount:
    values: dict[str, Any] = {
        "host": HOST,
        "port": dovecot.pop3s_port if tls == "implicit" else dovecot.pop3_port,
        "username": user,
        "password": dovecot.password(user),
        "tls": tls,
        "ca_file": dovecot.ca_file,
        "tls_name": "localhost",
        "timeout": 20.0,
    }
    values.update(changes)
    return MailboxAccount(**values)


def message(number: int, body: bytes = b"") -> bytes:
    return (
        b"From: sender@example.net\r\nTo: someone@example.org\r\n"
        b"Subject: test %d\r\nMessage-ID: <%d.%s@example.net>\r\n\r\n"
        b"Line one.\r\n.A line that starts with a dot\r\n..two dots\r\n.\r\n"
        % (number, number, secrets.token_hex(4).encode())
    ) + body


def session(dovecot: DovecotMail, user: str, tls: str = "implicit", **changes: Any) -> Pop3Session:
    opened: Pop3Session = wait(connect_pop3(account(dovecot, user, tls, **changes), reactor))
    return opened


def fetch(opened: Pop3Session, remote: RemoteMessage) -> tuple[bytes, int, int]:
    """The message's bytes, the count the client gave, and how many pieces it came in."""
    pieces: list[bytes] = []
    octets = wait(opened.retrieve(remote, pieces.append))
    return b"".join(pieces), octets, len(pieces)


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_list_retrieve_delete_close_and_the_messages_are_gone(
    dovecot: DovecotMail, user: str, tls: str
) -> None:
    sent = [message(number) for number in range(3)]
    for content in sent:
        dovecot.deliver(user, content)
    opened = session(dovecot, user, tls)
    assert opened.has("UIDL") and opened.has("PIPELINING") and not opened.has("STLS")
    listed = wait(opened.list_messages())
    assert [remote.number for remote in listed] == [1, 2, 3]
    assert [remote.size for remote in listed] == [len(content) for content in sent]
    for remote, content in zip(listed, sent, strict=True):
        fetched, octets, _pieces = fetch(opened, remote)
        assert fetched == content and octets == len(content)
    wait(opened.delete(listed[:2]))
    assert len(dovecot.messages(user)) == 3  # nothing gone before QUIT
    wait(opened.close())
    left = dovecot.messages(user)
    assert [stored.content for stored in left] == [sent[2]]


def test_deletions_are_dropped_when_the_session_is_aborted(dovecot: DovecotMail, user: str) -> None:
    for number in range(2):
        dovecot.deliver(user, message(number))
    opened = session(dovecot, user)
    listed = wait(opened.list_messages())
    wait(opened.delete(listed))
    opened.abort()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # Dovecot notices the lost connection and unlocks
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
        reactor.doIteration(0.05)  # type: ignore[attr-defined]
        again = connect_pop3(account(dovecot, user), reactor)
        try:
            reopened = wait(again)
            break
        except FetchError as error:
            assert "IN-USE" in str(error) or "lock" in str(error).lower()
    assert len(dovecot.messages(user)) == 2
    assert [remote.uid for remote in wait(reopened.list_messages())] == [remote.uid for remote in listed]
    wait(reopened.close())


def test_uids_are_the_same_in_the_next_session_and_nothing_is_deleted_without_dele(
    dovecot: DovecotMail, user: str
) -> None:
    for number in range(4):
        dovecot.deliver(user, message(number))
    opened = session(dovecot, user)
    first = wait(opened.list_messages())
    fetch(opened, first[0])
    wait(opened.close())
    opened = session(dovecot, user, "starttls")
    second = wait(opened.list_messages())
    wait(opened.close())
    assert [remote.uid for remote in second] == [remote.uid for remote in first]
    assert len(set(remote.uid for remote in first)) == 4
    assert len(dovecot.messages(user)) == 4


def test_pipelined_retrieval_of_many_messages_matches_each_message(dovecot: DovecotMail, user: str) -> None:
    sent = [message(number, b"x" * (number * 97) + b"\r\n") for number in range(30)]
    for content in sent:
        dovecot.deliver(user, content)
    opened = session(dovecot, user)
    listed = wait(opened.list_messages())
    bodies: list[list[bytes]] = [[] for _ in listed]
    retrievals = [opened.retrieve(remote, bodies[index].append) for index, remote in enumerate(listed)]
    for retrieval in retrievals:
        wait(retrieval)
    assert [b"".join(body) for body in bodies] == sent
    wait(opened.close())


def test_a_one_megabyte_message_is_streamed_in_pieces(dovecot: DovecotMail, user: str) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    big = message(1, line * (1024 * 1024 // len(line)) + b".last line with a dot\r\n")
    dovecot.deliver(user, big)
    opened = session(dovecot, user)
    (remote,) = wait(opened.list_messages())
    fetched, octets, pieces = fetch(opened, remote)
    assert fetched == big and octets == len(big) and len(big) > 1024 * 1024
    assert pieces > 4  # passed on as it arrived, not held whole
    wait(opened.close())


def test_apop_on_the_plain_text_port_of_an_insecure_account(dovecot: DovecotMail, user: str) -> None:
    dovecot.deliver(user, message(1))
    opened = session(dovecot, user, "none", auth="apop")
    assert len(wait(opened.list_messages())) == 1
    wait(opened.close())


def test_user_pass_over_tls_when_asked(dovecot: DovecotMail, user: str) -> None:
    opened = session(dovecot, user, "starttls", auth="user")
    assert wait(opened.list_messages()) == []
    wait(opened.close())


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_a_wrong_password_is_authentication_failed(dovecot: DovecotMail, user: str, tls: str) -> None:
    error = failure(connect_pop3(account(dovecot, user, tls, password="not-the-password"), reactor))
    assert isinstance(error, AuthenticationFailed)
    assert "not-the-password" not in str(error)
    deadline = time.monotonic() + 5
    while f"user=<{user}>" not in dovecot.log_tail(400) and time.monotonic() < deadline:
        # the client drops the connection (a reactor turn later); Dovecot then logs the attempt
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
        reactor.doIteration(0.05)  # type: ignore[attr-defined]
    assert f"user=<{user}>" in dovecot.log_tail(400)


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_a_certificate_for_another_name_is_refused(dovecot: DovecotMail, user: str, tls: str) -> None:
    error = failure(connect_pop3(account(dovecot, user, tls, tls_name="pop.example.net"), reactor))
    assert isinstance(error, TlsRefused)
    assert "pop.example.net" in str(error)
    assert f"user=<{user}>" not in dovecot.log_tail(400)  # no credentials were sent


def test_a_certificate_from_an_unknown_ca_is_refused(dovecot: DovecotMail, user: str) -> None:
    error = failure(connect_pop3(account(dovecot, user, ca_file=""), reactor))  # the system's roots
    assert isinstance(error, TlsRefused)


def test_nothing_listening_is_a_fetch_error_naming_the_server(dovecot: DovecotMail, user: str) -> None:
    from tests.integration.peers import free_port

    port = free_port()
    error = failure(connect_pop3(account(dovecot, user, port=port), reactor))
    assert type(error) is FetchError and f"{HOST}:{port}" in str(error)
