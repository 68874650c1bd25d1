"""The poller in memory: a fake mail server, the real reception over a MemorySpool, a Clock.

What a user would notice: mail appears in the queue once, is deleted on the
server only once it is durable, is kept when asked (and deleted after N days),
is never fetched twice across restarts (beyond the one in flight at a crash),
oversized mail is reported once, a busy server gets at most N sessions, a
failing account backs off, refused logins raise one alert, multidrop routes
and suppresses duplicate copies, and "fetch now" never runs two polls at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import formatEvent
from zope.interface import implementer

from gateway.fetch import AuthenticationFailed, FetchError, IMailboxSession, MailboxAccount, RemoteMessage
from gateway.fetch import intake as intake_module
from gateway.fetch import poller as poller_module
from gateway.fetch.accounts import FetchAccount, FetchConfig, MultidropConfig
from gateway.fetch.poller import MAX_BACKOFF, FetchService
from gateway.fetch.seen import TABLE as SEEN_TABLE
from gateway.filters.testing import StaticFilter
from gateway.model import CONTINUE, Direction, Stage, Verdict
from gateway.state.memory import MemoryStore
from tests.unit.reception_driver import Driver
from tests.unit.reception_driver import fired as fired_value


def fired(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (everything here is in memory)."""
    return fired_value(deferred)


# -- a fake mail server --------------------------------------------------------------------------------


@attrs.define
class Mailbox:
    messages: list[tuple[str, bytes]] = attrs.field(factory=list)  # (uid, content), server order
    next_uid: int = 1
    idling: list[MemoryMailboxSession] = attrs.field(factory=list)  # sessions in IDLE on it


class MemoryMailServer:
    """Mailboxes by (username, folder); hands out sessions like connect_pop3 / connect_imap."""

    def __init__(self) -> None:
        self.mailboxes: dict[tuple[str, str], Mailbox] = {}
        self.passwords: dict[str, str] = {}
        self.connects: list[MailboxAccount] = []
        self.open_sessions = 0
        self.most_open = 0
        self.hold_connects = False
        self.held: list[Deferred[Any]] = []
        self.connect_error: Exception | None = None
        self.drop_at: str | None = None  # a uid whose retrieval loses the connection
        self.retrieved: list[str] = []
        self.capabilities = frozenset({"UIDL", "IDLE", "MOVE"})
        self.logouts: list[tuple[str, bool]] = []  # (folder, whether it left IDLE with DONE first)

    def deliver(self, user: str, content: bytes, folder: str = "INBOX") -> str:
        box = self.mailboxes.setdefault((user, folder), Mailbox())
        uid = f"{folder}-{box.next_uid}"
        box.next_uid += 1
        box.messages.append((uid, content))
        for session in list(box.idling):
            session.tell()
        return uid

    def idling(self, user: str, folder: str = "INBOX") -> list[MemoryMailboxSession]:
        return list(self.mailboxes.get((user, folder), Mailbox()).idling)

    def drop_idle(self, user: str, folder: str = "INBOX") -> None:
        """The server (or the network) drops the sessions in IDLE on this folder."""
        for session in self.idling(user, folder):
            session.drop(FetchError("lost connection with imap.example.net:993"))

    def contents(self, user: str, folder: str = "INBOX") -> list[bytes]:
        return [content for _uid, content in self.mailboxes.get((user, folder), Mailbox()).messages]

    def connect(self, account: MailboxAccount, clock: Any) -> Deferred[Any]:
        self.connects.append(account)
        if self.connect_error is not None:
            return fail(self.connect_error)
        if self.passwords.get(account.username) != account.password:
            return fail(AuthenticationFailed(f"{account.host} refused the login of {account.username}"))
        session = MemoryMailboxSession(
            self,
            self.mailboxes.setdefault((account.username, account.folder), Mailbox()),
            account.username,
            account.folder,
        )
        self.open_sessions += 1
        self.most_open = max(self.most_open, self.open_sessions)
        if self.hold_connects:
            held: Deferred[Any] = Deferred()
            self.held.append(held)
            return held.addCallback(lambda _: session)
        return succeed(session)


@implementer(IMailboxSession)
class MemoryMailboxSession:
    """An IMailboxSession on a Mailbox: deletions happen at close, nothing at abort.

    Beyond the interface, what ImapSession adds: `move` (at once) and `idle`/`done`.
    """

    def __init__(self, server: MemoryMailServer, box: Mailbox, user: str, folder: str) -> None:
        self.server = server
        self.box = box
        self.user = user
        self.folder = folder
        self.capabilities = server.capabilities
        self.marked: set[str] = set()
        self.ended = False
        self.on_change: Callable[[], None] | None = None
        self.idle_ended: Deferred[None] | None = None

    def list_messages(self) -> Deferred[list[RemoteMessage]]:
        return succeed(
            [RemoteMessage(uid, len(content), n) for n, (uid, content) in enumerate(self.box.messages, 1)]
        )

    def retrieve(self, message: RemoteMessage, write: Callable[[bytes], None]) -> Deferred[int]:
        content = dict(self.box.messages)[message.uid]
        if self.server.drop_at == message.uid:
            write(content[:10])
            self.abort()
            return fail(FetchError("lost connection with pop.example.net:995 while retrieving"))
        self.server.retrieved.append(message.uid)
        middle = len(content) // 2
        write(content[:middle])
        write(content[middle:])
        return succeed(len(content))

    def delete(self, messages: list[RemoteMessage]) -> Deferred[None]:
        self.marked.update(message.uid for message in messages)
        return succeed(None)

    def close(self) -> Deferred[None]:
        idling = self.idle_ended is not None
        self.done()
        self.box.messages = [(uid, content) for uid, content in self.box.messages if uid not in self.marked]
        if idling:
            self.server.logouts.append((self.folder, True))
        self._end()
        return succeed(None)

    def abort(self) -> None:
        self.drop(FetchError("session aborted"))

    def move(self, messages: list[RemoteMessage], folder: str) -> Deferred[None]:
        uids = {message.uid for message in messages}
        target = self.server.mailboxes.setdefault((self.user, folder), Mailbox())
        target.messages.extend((uid, content) for uid, content in self.box.messages if uid in uids)
        self.box.messages = [(uid, content) for uid, content in self.box.messages if uid not in uids]
        return succeed(None)

    def idle(self, on_change: Callable[[], None]) -> Deferred[None]:
        assert self.idle_ended is None and not self.ended, "IDLE twice, or on an ended session"
        self.on_change = on_change
        self.idle_ended = Deferred()
        self.box.idling.append(self)
        return self.idle_ended

    def done(self) -> Deferred[None]:
        ended, self.idle_ended = self.idle_ended, None
        if ended is not None:
            self.box.idling.remove(self)
            ended.callback(None)
        return succeed(None)

    def tell(self) -> None:
        assert self.on_change is not None
        self.on_change()

    def drop(self, error: FetchError) -> None:
        ended, self.idle_ended = self.idle_ended, None
        if ended is not None:
            self.box.idling.remove(self)
            ended.errback(error)
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.server.open_sessions -= 1


# -- the gateway side ----------------------------------------------------------------------------------


def account(name: str = "sales", **changes: Any) -> FetchAccount:
    values: dict[str, Any] = {
        "name": name,
        "protocol": "pop3",
        "server": "pop.example.net",
        "port": 995,
        "username": name,
        "password_file": "/nonexistent",
        "password": f"{name}-secret",
        "deliver_to": (f"{name}@example.com",),
    }
    values.update(changes)
    return FetchAccount(**values)


class Gateway:
    """The reception (over a MemorySpool), a MemoryStore and a FetchService on one Clock."""

    def __init__(
        self, *accounts: FetchAccount, server: MemoryMailServer | None = None, **options: Any
    ) -> None:
        self.driver = Driver("[filters]\ninbound = []\n", appended=options.pop("appended", None))
        self.clock = self.driver.clock
        self.store = self.driver.store
        self.spool = self.driver.spool
        self.server = server or MemoryMailServer()
        for each in accounts:
            self.server.passwords.setdefault(each.username, each.password)
        self.config = FetchConfig(accounts=accounts, **options)
        self.service = self.restart()

    def restart(self, store: MemoryStore | None = None) -> FetchService:
        """A new FetchService (a gateway restart): nothing kept in memory, the store and spool stay."""
        self.service = FetchService(
            self.config,
            self.driver.reception,
            store or self.store,
            self.clock,
            hostname="gw.test",
            postmaster="postmaster@example.com",
            connect={"pop3": self.server.connect, "imap": self.server.connect},
        )
        return self.service

    def poll(self, name: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = fired(self.service.poll_now(name))
        return result

    def queued(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(sender, recipients, content) of each queued message, in queue order."""
        found = []
        for queue_id in sorted(self.spool.messages):
            message = self.spool.messages[queue_id]
            recipients = tuple(r.recipient.address for r in message.recipients)
            found.append((message.envelope.mail_from, recipients, self.spool.contents[queue_id]))
        return found

    def bodies(self) -> list[bytes]:
        return [content.split(b"\r\n", 2)[2] for _sender, _recipients, content in self.queued()]


def message(number: int, *, to: str = "", extra: bytes = b"") -> bytes:
    return (
        b"Return-Path: <sender%d@partner.example>\r\nMessage-ID: <%d@partner.example>\r\n" % (number, number)
        + (f"To: {to}\r\n".encode() if to else b"")
        + extra
        + b"Subject: number %d\r\n\r\nbody %d\r\n" % (number, number)
    )


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The log lines of the poller and the intake."""
    lines: list[str] = []
    monkeypatch.setattr(poller_module.log, "observer", lambda event: lines.append(formatEvent(event)))
    monkeypatch.setattr(intake_module.log, "observer", lambda event: lines.append(formatEvent(event)))
    return lines


# -- single-drop, seen UIDs, deletion ------------------------------------------------------------------


def test_single_drop_queues_each_message_once_with_a_received_header_then_deletes_it() -> None:
    gateway = Gateway(account())
    for number in (1, 2):
        gateway.server.deliver("sales", message(number))
    [result] = gateway.poll("sales")
    assert (result["messages"], result["deleted"], result["error"]) == (2, 2, None)
    queued = gateway.queued()
    assert [(sender, recipients) for sender, recipients, _ in queued] == [
        ("sender1@partner.example", ("sales@example.com",)),
        ("sender2@partner.example", ("sales@example.com",)),
    ]
    first_line, second_line = queued[0][2].split(b"\r\n")[:2]
    assert first_line == b"Received: from pop.example.net by gw.test with POP3 (MailGate account sales)"
    assert second_line.startswith(b"\tid ") and b" for <sales@example.com>; " in second_line
    assert gateway.bodies() == [message(1), message(2)]  # byte for byte after our header
    assert gateway.server.contents("sales") == []
    assert gateway.poll("sales")[0]["messages"] == 0
    assert len(gateway.queued()) == 2


def test_kept_mail_is_not_fetched_again_by_the_next_poll_nor_after_a_restart() -> None:
    gateway = Gateway(account(keep=True))
    gateway.server.deliver("sales", message(1))
    assert gateway.poll()[0]["messages"] == 1
    assert gateway.poll()[0]["messages"] == 0
    gateway.restart()
    gateway.server.deliver("sales", message(2))
    assert gateway.poll()[0]["messages"] == 1
    assert gateway.bodies() == [message(1), message(2)]
    assert gateway.server.contents("sales") == [message(1), message(2)]  # kept


def test_seen_uids_are_pruned_when_the_server_no_longer_has_them() -> None:
    gateway = Gateway(account(keep=True))
    uid = gateway.server.deliver("sales", message(1))
    gateway.poll()
    assert uid in fired(gateway.store.get(SEEN_TABLE, "sales\tINBOX"))
    gateway.server.mailboxes["sales", "INBOX"].messages.clear()  # deleted by someone else
    gateway.poll()
    assert fired(gateway.store.get(SEEN_TABLE, "sales\tINBOX")) == {}


class CrashingStore(MemoryStore):
    """A store that fails the seen-UID record of one message: a crash right after its queuing."""

    def __init__(self, clock: Any, uid: str) -> None:
        super().__init__(clock)
        self.uid = uid

    def put(self, table: str, key: str, value: Any, ttl: float | None = None) -> Deferred[None]:
        if table == SEEN_TABLE and self.uid in value:
            return fail(OSError("killed"))
        return super().put(table, key, value, ttl)


def test_a_crash_between_queuing_and_recording_fetches_that_one_again_and_skips_none() -> None:
    gateway = Gateway(account())
    uids = [gateway.server.deliver("sales", message(number)) for number in (1, 2, 3)]
    crashing = CrashingStore(gateway.clock, uids[1])
    gateway.restart(store=crashing)
    [result] = gateway.poll()
    assert result["messages"] == 1 and "killed" in result["error"]
    assert gateway.bodies() == [message(1), message(2)]  # the second is queued, but not recorded
    assert gateway.server.contents("sales") == [message(1), message(2), message(3)]  # nothing deleted
    crashing.entries.update(gateway.store.entries)
    gateway.store.entries = crashing.entries  # the store as the crash left it
    gateway.restart()
    [result] = gateway.poll()
    assert result["error"] is None
    assert gateway.bodies() == [
        message(1),
        message(2),
        message(2),
        message(3),
    ]  # one duplicate: the one in flight
    assert gateway.server.contents("sales") == []


def test_a_temporary_refusal_leaves_the_message_on_the_server_for_the_next_poll() -> None:
    gateway = Gateway(account())
    gateway.server.deliver("sales", message(1))
    gateway.spool.failure = OSError("disk full")
    [result] = gateway.poll()
    assert (result["messages"], result["left"], result["deleted"]) == (0, 1, 0)
    assert gateway.server.contents("sales") == [message(1)]
    assert gateway.service.status()["sales"]["last_error"].endswith(
        "451 4.3.0 Temporary failure: cannot queue the message, try again"
    )
    gateway.spool.failure = None
    assert gateway.poll()[0]["messages"] == 1
    assert gateway.server.contents("sales") == [] and gateway.bodies() == [message(1)]


def test_a_filter_deferring_leaves_it_and_a_refusal_is_quarantined_and_deleted_on_the_server() -> None:
    answers: dict[Stage, Any] = {Stage.DATA: Verdict.defer("try later")}
    gateway = Gateway(account(), appended={Direction.FETCHED: (StaticFilter("rules", answers),)})
    gateway.server.deliver("sales", message(1))
    assert gateway.poll()[0]["left"] == 1
    answers[Stage.DATA] = Verdict.reject("forbidden word")
    assert gateway.poll()[0]["messages"] == 1
    [queued] = gateway.spool.messages.values()
    assert queued.state == "hold" and gateway.server.contents("sales") == []


def test_a_dropped_connection_deletes_nothing_and_the_next_poll_deletes_without_fetching_again() -> None:
    gateway = Gateway(account())
    first = gateway.server.deliver("sales", message(1))
    second = gateway.server.deliver("sales", message(2))
    gateway.server.drop_at = second
    [result] = gateway.poll()
    assert result["messages"] == 1 and "lost connection" in result["error"]
    assert gateway.server.contents("sales") == [message(1), message(2)]
    gateway.server.drop_at = None
    gateway.poll()
    assert gateway.server.retrieved == [first, second]  # the first was not fetched again
    assert gateway.bodies() == [message(1), message(2)] and gateway.server.contents("sales") == []


def test_kept_mail_is_deleted_once_it_was_first_fetched_delete_after_ago() -> None:
    gateway = Gateway(account(keep=True, delete_after=3 * 86400.0), account("other", keep=True))
    gateway.server.deliver("sales", message(1))
    gateway.server.deliver("other", message(2))
    gateway.poll()
    gateway.clock.advance(2 * 86400)
    gateway.server.deliver("sales", message(3))
    assert gateway.poll("sales")[0]["deleted"] == 0
    gateway.clock.advance(86400)
    assert gateway.poll("sales")[0]["deleted"] == 1
    assert gateway.server.contents("sales") == [message(3)]
    gateway.clock.advance(2 * 86400)
    gateway.poll()
    assert gateway.server.contents("sales") == []
    assert gateway.server.contents("other") == [message(2)]  # keep without delete_after: for ever
    assert gateway.bodies() == [message(1), message(2), message(3)]


def test_oversized_mail_stays_on_the_server_and_is_reported_once(events: list[str]) -> None:
    gateway = Gateway(account(max_size=150))
    big = message(1, extra=b"X-Padding: " + b"x" * 200 + b"\r\n")
    uid = gateway.server.deliver("sales", big)
    gateway.server.deliver("sales", message(2))
    assert gateway.poll()[0]["oversized"] == 1
    gateway.poll()
    assert gateway.server.contents("sales") == [big]
    reports = [line for line in events if "over max_size" in line]
    assert reports == [
        f"fetch: sales: message {uid} in INBOX is {len(big)} octets, over max_size 150: left on the server"
    ]
    assert gateway.bodies() == [message(2)]


def test_at_most_max_messages_per_poll_oldest_first() -> None:
    gateway = Gateway(account(max_messages=2))
    for number in (1, 2, 3):
        gateway.server.deliver("sales", message(number))
    assert gateway.poll()[0]["messages"] == 2
    assert gateway.bodies() == [message(1), message(2)] and gateway.server.contents("sales") == [message(3)]
    gateway.poll()
    assert gateway.bodies() == [message(1), message(2), message(3)]


def test_imap_folders_are_polled_each_with_their_own_seen_uids() -> None:
    gateway = Gateway(account(protocol="imap", folders=("INBOX", "Ventes/Été"), keep=True))
    gateway.server.deliver("sales", message(1))
    gateway.server.deliver("sales", message(2), folder="Ventes/Été")
    assert gateway.poll()[0]["messages"] == 2
    assert [each.folder for each in gateway.server.connects] == ["INBOX", "Ventes/Été"]
    gateway.server.deliver("sales", message(3), folder="Ventes/Été")
    gateway.restart()
    assert gateway.poll()[0]["messages"] == 1
    assert gateway.bodies() == [message(1), message(2), message(3)]


# -- recipients ------------------------------------------------------------------------------------------


def test_a_recipient_refused_at_rcpt_goes_to_the_postmaster_instead() -> None:
    def decide(request: Any) -> Verdict:
        if request.recipient.address.startswith("bob@"):
            return Verdict.reject("no such user", code=550, enhanced="5.1.1")
        return CONTINUE

    rcpt = StaticFilter("recipients", {Stage.RCPT: decide})
    gateway = Gateway(
        account(deliver_to=("alice@example.com", "bob@example.com")),
        appended={Direction.FETCHED: (rcpt,)},
    )
    gateway.server.deliver("sales", message(1))
    gateway.poll()
    [(_sender, recipients, content)] = gateway.queued()
    assert recipients == ("alice@example.com", "postmaster@example.com")
    assert b" for <" not in content.split(b"\r\n\r\n")[0]  # several recipients: no "for" clause
    assert gateway.server.contents("sales") == []


def test_a_sender_refused_at_mail_is_held_in_the_quarantine_never_lost() -> None:
    mail = StaticFilter("lists", {Stage.MAIL: Verdict.reject("sender blacklisted")})
    gateway = Gateway(account(), appended={Direction.FETCHED: (mail,)})
    gateway.server.deliver("sales", message(1))
    assert gateway.poll()[0]["messages"] == 1
    [queued] = gateway.spool.messages.values()
    assert queued.state == "hold" and queued.quarantine is not None
    assert queued.quarantine.reason == "refused at MAIL FROM: 554 5.7.1 sender blacklisted"
    assert gateway.server.contents("sales") == []


def multidrop_account(**changes: Any) -> FetchAccount:
    return account(
        "public",
        deliver_to=(),
        multidrop=MultidropConfig(
            local_domains=("example.net",),
            local_parts=(("alice", "alice@example.com"), ("bob", "bob@example.com")),
        ),
        **changes,
    )


def test_multidrop_delivers_to_each_user_and_the_unknown_ones_to_the_postmaster(events: list[str]) -> None:
    gateway = Gateway(multidrop_account())
    gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    gateway.server.deliver("public", message(2, to="bob@example.net, Alice <alice@example.net>"))
    gateway.server.deliver("public", message(3, extra=b"X-Original-To: mallory@example.net\r\n"))
    assert gateway.poll()[0]["messages"] == 3
    assert [recipients for _sender, recipients, _content in gateway.queued()] == [
        ("alice@example.com",),
        ("bob@example.com", "alice@example.com"),
        ("postmaster@example.com",),
    ]
    assert any(
        "no internal user for <mallory@example.net>: sent to <postmaster@example.com>" in e for e in events
    )


def test_multidrop_suppresses_a_second_copy_of_a_message_id_per_recipient() -> None:
    gateway = Gateway(multidrop_account())
    # the provider delivered one message twice into the public mailbox: once per envelope recipient
    gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    gateway.server.deliver("public", message(1, extra=b"Delivered-To: bob@example.net\r\n"))
    gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    [result] = gateway.poll()
    assert result["messages"] == 3 and result["deleted"] == 3  # the duplicate is done with, too
    assert [recipients for _s, recipients, _c in gateway.queued()] == [
        ("alice@example.com",),
        ("bob@example.com",),
    ]
    gateway.clock.advance(8 * 86400)  # duplicates are remembered for 7 days
    gateway.server.deliver("public", message(1, extra=b"Delivered-To: alice@example.net\r\n"))
    gateway.poll()
    assert len(gateway.queued()) == 3


# -- scheduling, concurrency, failures -----------------------------------------------------------------


def test_the_timers_poll_every_interval_the_first_polls_staggered_soon_after_start() -> None:
    accounts = [account(f"user{n}", interval=60.0) for n in range(3)]
    gateway = Gateway(*accounts)
    gateway.service.startService()
    delays = sorted(call.getTime() - gateway.clock.seconds() for call in gateway.clock.getDelayedCalls())
    assert delays == [1.0, 11.0, 21.0]
    for step in (1, 10, 10):  # (a Clock runs all that is due at the time it was advanced to)
        gateway.clock.advance(step)
    assert [each.username for each in gateway.server.connects] == ["user0", "user1", "user2"]
    gateway.clock.advance(39)
    assert len(gateway.server.connects) == 3
    gateway.clock.advance(1)  # 60 s after user0's first poll
    assert len(gateway.server.connects) == 4
    fired(gateway.service.stopService())
    assert gateway.clock.getDelayedCalls() == []


def test_at_most_per_server_sessions_at_once_to_one_server() -> None:
    gateway = Gateway(*[account(f"user{n}") for n in range(4)], per_server_sessions=2)
    for n in range(4):
        gateway.server.deliver(f"user{n}", message(n))
    gateway.server.hold_connects = True
    polled = gateway.service.poll_now()
    assert len(gateway.server.connects) == 2
    gateway.server.held.pop(0).callback(None)
    assert len(gateway.server.connects) == 3
    while gateway.server.held:
        gateway.server.held.pop(0).callback(None)
    assert [result["messages"] for result in fired(polled)] == [1, 1, 1, 1]
    assert gateway.server.most_open == 2


def test_a_failing_account_backs_off_up_to_30_minutes_and_recovers_after_a_success() -> None:
    gateway = Gateway(account(interval=60.0))
    gateway.service.startService()
    gateway.server.connect_error = FetchError("cannot connect to pop.example.net:995: Connection refused")
    delays = []
    gateway.clock.advance(1)
    for _ in range(7):
        [call] = gateway.clock.getDelayedCalls()
        delays.append(call.getTime() - gateway.clock.seconds())
        gateway.clock.advance(delays[-1])
    assert delays == [120, 240, 480, 960, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    status = gateway.service.status()["sales"]
    assert status["errors"] == 8 and "Connection refused" in status["last_error"]
    gateway.server.connect_error = None
    gateway.clock.advance(MAX_BACKOFF)
    [call] = gateway.clock.getDelayedCalls()
    assert call.getTime() - gateway.clock.seconds() == 60
    assert gateway.service.status()["sales"]["last_success"] == gateway.clock.seconds()


def test_three_refused_logins_in_a_row_log_one_alert_for_the_account(events: list[str]) -> None:
    gateway = Gateway(account(), account("other"))
    gateway.server.passwords["sales"] = "changed"
    for _ in range(5):
        gateway.poll()
    alerts = [line for line in events if "ALERT" in line]
    assert alerts == ["fetch: ALERT: account sales: authentication failed 3 times"]
    assert "sales-secret" not in "".join(events)
    gateway.server.passwords["sales"] = "sales-secret"
    gateway.poll()
    gateway.server.passwords["sales"] = "changed again"
    for _ in range(3):
        gateway.poll()
    assert len([line for line in events if "ALERT" in line]) == 2  # a new run of failures: a new alert


def test_poll_now_during_a_poll_runs_one_more_poll_right_after_it() -> None:
    gateway = Gateway(account())
    gateway.server.deliver("sales", message(1))
    gateway.server.hold_connects = True
    first = gateway.service.poll_now("sales")
    second = gateway.service.poll_now("sales")
    third = gateway.service.poll_now()
    assert len(gateway.server.connects) == 1  # not started twice
    gateway.server.deliver("sales", message(2))
    gateway.server.held.pop().callback(None)
    assert len(gateway.server.connects) == 2  # one more, for both requests
    gateway.server.held.pop().callback(None)
    assert [r["messages"] for r in fired(first)] == [2]  # (the list was taken after the 2nd arrived)
    after = fired(second)
    assert [r["messages"] for r in after] == [0] and fired(third) == after
    assert gateway.server.held == [] and len(gateway.server.connects) == 2


def test_poll_now_of_an_unknown_account_says_so() -> None:
    gateway = Gateway(account())
    with pytest.raises(ValueError, match="no fetch account named 'nobody'"):
        gateway.service.poll_now("nobody")


def test_etrn_polls_the_accounts_delivering_into_the_domain() -> None:
    gateway = Gateway(account(), account("other", deliver_to=("other@corp.example",)), multidrop_account())
    assert gateway.service.poll_domain("example.com") == ["sales", "public"]
    assert gateway.service.poll_domain("CORP.example") == ["other"]
    assert gateway.service.poll_domain("nowhere.example") == []


def test_status_counts_polls_messages_bytes_and_errors_per_account() -> None:
    gateway = Gateway(account(), account("other"))
    gateway.server.deliver("sales", message(1))
    gateway.poll()
    gateway.server.passwords["other"] = "changed"
    gateway.poll("other")
    status = gateway.service.status()
    sales, other = status["sales"], status["other"]
    assert (sales["polls"], sales["messages"], sales["bytes"], sales["errors"]) == (1, 1, len(message(1)), 0)
    assert sales["last_success"] == gateway.clock.seconds() and sales["server"] == "pop.example.net:995"
    assert (other["polls"], other["errors"], other["last_success"]) == (2, 1, gateway.clock.seconds())
    assert "refused the login of other" in other["last_error"]
    assert all("secret" not in repr(value) for value in status.values())


def test_stopping_aborts_a_poll_under_way_and_deletes_nothing(tmp_path: Path) -> None:
    gateway = Gateway(account())
    gateway.server.deliver("sales", message(1))
    gateway.server.hold_connects = True
    gateway.service.startService()
    gateway.clock.advance(1)
    stopped = gateway.service.stopService()
    gateway.server.held.pop().callback(None)
    fired(stopped)
    assert gateway.server.contents("sales") == [message(1)] and gateway.server.open_sessions == 0
    assert gateway.clock.getDelayedCalls() == [] and os.path.isdir(tmp_path)


# -- IMAP: IDLE and move_to ------------------------------------------------------------------------------


def watched(name: str = "sales", **changes: Any) -> FetchAccount:
    values: dict[str, Any] = {
        "protocol": "imap",
        "server": "imap.example.net",
        "port": 993,
        "idle": True,
        "folders": ("INBOX", "Ventes"),
        "interval": 3600.0,
    }
    values.update(changes)
    return account(name, **values)


def started(gateway: Gateway) -> Gateway:
    """The service started, its first poll done and its IDLE watchers settled in."""
    gateway.service.startService()
    gateway.clock.advance(1)  # the first poll, then a watcher per folder
    gateway.clock.advance(poller_module.IDLE_SETTLE)  # each watcher's own look at its folder
    return gateway


def test_idle_watches_every_folder_after_the_first_poll_and_new_mail_is_fetched_within_a_second() -> None:
    gateway = started(Gateway(watched(), watched("other", folders=("INBOX",))))
    gateway.clock.advance(poller_module.SPREAD)  # the other account's first poll, and its watcher
    next_poll = gateway.service.status()["sales"]["next_poll"]
    watching = [len(gateway.server.idling(user, folder)) for user, folder in gateway.server.mailboxes]
    assert watching == [1, 1, 1]
    assert gateway.service.status()["sales"]["idle"] == ["INBOX", "Ventes"]  # (mailgatectl fetch status)
    connects = len(gateway.server.connects)
    gateway.server.deliver("sales", message(1), folder="Ventes")
    gateway.server.deliver("sales", message(2), folder="Ventes")  # together: one poll
    gateway.server.deliver("other", message(3))
    assert gateway.bodies() == []
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert sorted(gateway.bodies()) == [message(1), message(2), message(3)]
    polled = [(each.username, each.folder) for each in gateway.server.connects[connects:]]
    assert sorted(polled) == [("other", "INBOX"), ("sales", "Ventes")]  # only the folders that changed
    assert gateway.server.contents("sales", "Ventes") == [] and gateway.server.idling("sales", "Ventes")
    assert gateway.service.status()["sales"]["next_poll"] == next_poll  # the hourly poll stays as it was


def test_mail_arriving_while_a_poll_runs_is_polled_right_after_it() -> None:
    gateway = started(Gateway(watched(folders=("INBOX",))))
    gateway.server.hold_connects = True
    gateway.server.deliver("sales", message(1))
    gateway.clock.advance(poller_module.IDLE_SETTLE)  # a poll starts, connecting
    gateway.server.deliver("sales", message(2))  # listed by that poll
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert len(gateway.server.held) == 1  # never two polls of one account at once
    gateway.server.held.pop().callback(None)
    assert gateway.bodies() == [message(1), message(2)]
    assert len(gateway.server.held) == 1  # the change during the poll: one more poll right after
    gateway.server.deliver("sales", message(3))  # (before that poll lists the folder)
    gateway.server.held.pop().callback(None)
    assert gateway.bodies() == [message(1), message(2), message(3)]
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert len(gateway.server.held) == 1  # (the change seen during that poll: one more look, finding none)
    gateway.server.held.pop().callback(None)
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert gateway.server.held == [] and gateway.bodies() == [message(1), message(2), message(3)]


def test_the_timer_still_polls_every_interval_beside_idle() -> None:
    gateway = started(Gateway(watched()))
    connects = len(gateway.server.connects)
    gateway.server.mailboxes["sales", "INBOX"].messages.append(("INBOX-99", message(9)))  # IDLE missed it
    gateway.clock.advance(3600)
    assert [each.folder for each in gateway.server.connects[connects:]] == ["INBOX", "Ventes"]
    assert gateway.bodies() == [message(9)]


def test_a_dropped_idle_is_opened_again_with_backoff_and_looks_at_its_folder(events: list[str]) -> None:
    gateway = started(Gateway(watched(folders=("INBOX",))))
    gateway.server.drop_idle("sales")
    gateway.server.connect_error = FetchError("cannot connect to imap.example.net:993: Connection refused")
    waits = []
    for _ in range(3):
        now = gateway.clock.seconds()
        due = [call for call in gateway.clock.getDelayedCalls() if call.getTime() - now < 3000]
        [retry] = due
        waits.append(retry.getTime() - gateway.clock.seconds())
        gateway.clock.advance(waits[-1])
    assert waits == [5.0, 10.0, 20.0]
    assert (
        "fetch: sales: IDLE on INBOX ended (lost connection with imap.example.net:993): opened again in 5 s"
        in events
    )
    gateway.server.connect_error = None
    gateway.server.mailboxes["sales", "INBOX"].messages.append(("INBOX-99", message(9)))  # came meanwhile
    gateway.clock.advance(40)
    assert len(gateway.server.idling("sales")) == 1
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert gateway.bodies() == [message(9)]
    gateway.server.deliver("sales", message(10))
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert gateway.bodies() == [message(9), message(10)]


def test_idle_sessions_do_not_hold_the_per_server_sessions() -> None:
    gateway = started(Gateway(watched(), per_server_sessions=1))
    assert gateway.server.open_sessions == 2  # both folders in IDLE
    gateway.server.deliver("sales", message(1))
    gateway.clock.advance(poller_module.IDLE_SETTLE)
    assert gateway.bodies() == [message(1)] and gateway.server.most_open == 3


def test_stopping_ends_every_idle_with_done_and_logout() -> None:
    gateway = started(Gateway(watched()))
    stopped = gateway.service.stopService()
    gateway.clock.advance(0)  # (it fires on the next turn: not from within a connection's dataReceived)
    fired(stopped)
    assert sorted(gateway.server.logouts) == [("INBOX", True), ("Ventes", True)]
    assert gateway.server.open_sessions == 0 and gateway.clock.getDelayedCalls() == []
    gateway.server.deliver("sales", message(1))
    assert gateway.clock.getDelayedCalls() == [] and gateway.bodies() == []


def test_a_server_without_idle_is_said_once_and_left_to_the_timer(events: list[str]) -> None:
    gateway = Gateway(watched(folders=("INBOX",)))
    gateway.server.capabilities = frozenset({"UIDL"})
    started(gateway)
    assert gateway.server.open_sessions == 0
    gateway.clock.advance(3600)
    assert [line for line in events if "IDLE" in line] == [
        "fetch: sales: imap.example.net does not offer IDLE: INBOX is polled every 3600 s"
    ]
    [timer] = gateway.clock.getDelayedCalls()
    assert timer.getTime() - gateway.clock.seconds() == 3600


def test_move_to_moves_fetched_mail_there_instead_of_deleting_it() -> None:
    gateway = Gateway(watched(idle=False, folders=("INBOX",), move_to="Fetched"))
    gateway.server.deliver("sales", message(1))
    [result] = gateway.poll()
    assert (result["messages"], result["moved"], result["deleted"]) == (1, 1, 0)
    assert gateway.server.contents("sales") == [] and gateway.server.contents("sales", "Fetched") == [
        message(1)
    ]
    assert gateway.poll()[0]["messages"] == 0 and gateway.bodies() == [message(1)]


def test_move_to_with_keep_moves_what_delete_after_would_delete() -> None:
    gateway = Gateway(
        watched(idle=False, folders=("INBOX",), keep=True, delete_after=86400.0, move_to="Fetched")
    )
    gateway.server.deliver("sales", message(1))
    assert gateway.poll()[0]["moved"] == 0
    gateway.clock.advance(86400)
    assert gateway.poll()[0]["moved"] == 1
    assert gateway.server.contents("sales", "Fetched") == [message(1)] and gateway.bodies() == [message(1)]
