"""SDPS (POP3 ``*ENV``): the exchange, the config, and the envelope routing a multidrop mailbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from gateway.fetch import FetchError, MailboxAccount, ProtocolViolation, RemoteMessage
from tests.unit.test_fetch_accounts import account as account_text
from tests.unit.test_fetch_accounts import error, parse
from tests.unit.test_fetch_poller import (
    Gateway,
    MemoryMailboxSession,
    MemoryMailServer,
    events,
    message,
    multidrop_account,
)
from tests.unit.test_fetch_pop3 import Dialogue, failure_of, listed, result_of

__all__ = ["events"]  # the fixture, used by name

ENV = (
    b"+OK\r\n"
    b"public@isp.example\r\n"  # what Demon put on the first two lines is not used
    b"19991024093012\r\n"
    b"<sender@partner.example>\r\n"
    b"alice@example.net\r\n"
    b".\r\n"
)


def pop3_session(dialogue: Dialogue) -> tuple[Any, RemoteMessage]:
    session = dialogue.logged_in()
    [first] = listed(dialogue, session, b"+OK\r\n1 120\r\n.\r\n", b"+OK\r\n1 uid-1\r\n.\r\n")
    return session, first


def test_env_gives_the_envelope_sender_and_recipient() -> None:
    dialogue = Dialogue()
    session, first = pop3_session(dialogue)
    envelope = session.envelope(first)
    assert dialogue.sent() == b"*ENV 1\r\n"
    dialogue.server(ENV)
    assert result_of(envelope) == ("sender@partner.example", ("alice@example.net",))


def test_env_blank_sender_is_the_null_sender_and_several_recipients_are_all_taken() -> None:
    dialogue = Dialogue()
    session, first = pop3_session(dialogue)
    envelope = session.envelope(first)
    dialogue.sent()
    dialogue.server(b"+OK\r\nx\r\ny\r\n \r\n<alice@example.net>, bob@example.net\r\n.\r\n")
    assert result_of(envelope) == ("", ("alice@example.net", "bob@example.net"))


def test_env_refused_or_short_is_an_error() -> None:
    dialogue = Dialogue()
    session, first = pop3_session(dialogue)
    envelope = session.envelope(first)
    dialogue.sent()
    dialogue.server(b"-ERR unknown command\r\n")
    assert "refused *ENV 1" in str(failure_of(envelope))
    envelope = session.envelope(first)
    dialogue.sent()
    dialogue.server(b"+OK\r\nonly one line\r\n.\r\n")
    assert isinstance(failure_of(envelope), ProtocolViolation)


def test_sdps_is_for_pop3_multidrop_accounts_only(tmp_path: Path) -> None:
    multidrop = '[fetch.accounts.multidrop]\nlocal_domains = ["example.net"]'
    [public] = parse(account_text(tmp_path, target="sdps = true\n" + multidrop), tmp_path).accounts
    assert public.sdps
    [single] = parse(account_text(tmp_path), tmp_path).accounts
    assert not single.sdps  # the default
    assert "sdps" in error(account_text(tmp_path, "sdps = true"), tmp_path)  # single-drop: nothing to route
    imap = account_text(tmp_path, target="sdps = true\n" + multidrop).replace('"pop3"', '"imap"')
    assert "for POP3 accounts only" in error(imap, tmp_path)


class SdpsSession(MemoryMailboxSession):
    """A memory POP3 session whose server keeps the envelope (`envelopes[uid]`); *ENV refused without."""

    envelopes: dict[str, tuple[str, tuple[str, ...]]] = {}

    def envelope(self, message: RemoteMessage) -> Deferred[tuple[str, tuple[str, ...]]]:
        found = self.envelopes.get(message.uid)
        if found is None:
            return fail(FetchError("pop.example.net:995 refused *ENV 1 (no SDPS?): unknown command"))
        return succeed(found)


class SdpsServer(MemoryMailServer):
    def connect(self, account: MailboxAccount, clock: Any) -> Deferred[Any]:
        connected = super().connect(account, clock)

        def wrap(session: MemoryMailboxSession) -> SdpsSession:
            session.__class__ = SdpsSession
            assert isinstance(session, SdpsSession)
            return session

        return connected.addCallback(wrap)


@pytest.fixture
def envelopes(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, tuple[str, ...]]]:
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    monkeypatch.setattr(SdpsSession, "envelopes", table)
    return table


def test_sdps_recipients_route_ahead_of_the_headers_and_give_the_sender(
    envelopes: dict[str, tuple[str, tuple[str, ...]]],
) -> None:
    gateway = Gateway(multidrop_account(sdps=True), server=SdpsServer())
    # The headers say alice; the envelope the server kept says bob (a Bcc: the headers never name him).
    uid = gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    envelopes[uid] = ("", ("bob@example.net",))
    assert gateway.poll()[0]["messages"] == 1
    [(sender, recipients, _content)] = gateway.queued()
    assert (sender, recipients) == ("", ("bob@example.com",))


def test_without_sdps_the_same_message_goes_by_its_headers(
    envelopes: dict[str, tuple[str, tuple[str, ...]]],
) -> None:
    gateway = Gateway(multidrop_account(), server=SdpsServer())
    uid = gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    envelopes[uid] = ("", ("bob@example.net",))
    gateway.poll()
    [(sender, recipients, _content)] = gateway.queued()
    assert (sender, recipients) == ("sender1@partner.example", ("alice@example.com",))


def test_a_server_refusing_env_is_warned_about_and_routed_by_the_headers(
    envelopes: dict[str, tuple[str, tuple[str, ...]]], events: list[str]
) -> None:
    gateway = Gateway(multidrop_account(sdps=True), server=SdpsServer())
    gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    assert gateway.poll()[0]["messages"] == 1
    assert [recipients for _s, recipients, _c in gateway.queued()] == [("alice@example.com",)]
    assert any("no SDPS envelope" in line and "routing by the headers alone" in line for line in events)


def test_sdps_recipient_nobody_maps_goes_to_the_postmaster(
    envelopes: dict[str, tuple[str, tuple[str, ...]]],
) -> None:
    gateway = Gateway(multidrop_account(sdps=True), server=SdpsServer())
    uid = gateway.server.deliver("public", message(1))
    envelopes[uid] = ("sender@partner.example", ("mallory@example.net",))
    gateway.poll()
    assert [recipients for _s, recipients, _c in gateway.queued()] == [("postmaster@example.com",)]
