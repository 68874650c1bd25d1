"""The quarantine: listing with selections, show, release, delete, training, expiry and the daily notice."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.admin.control import ControlFactory
from gateway.config import DeliveryConfig
from gateway.delivery.manager import QueueManager
from gateway.delivery.router import Router
from gateway.filters.testing import RecordingOutbox
from gateway.model import Envelope, Quarantine, Recipient, RecipientResult, Session
from gateway.quarantine import QuarantineRoom, Selection
from gateway.quarantine.service import QuarantineService, seconds_until
from gateway.queue.memory import MemorySpool
from tests.unit.reception_driver import fired

DAY = 86400.0
NOW = 1_800_000_000.0
VIRUS = Quarantine(
    "virus Eicar-Signature", "inbound", (("clamav", "quarantine", "virus Eicar-Signature", 0.0),)
)
SPAM = Quarantine("bayes 8.2", "inbound", (("bayes", "quarantine", "bayes 8.2", 8.2),))
REJECTED = Quarantine(
    "forbidden attachment", "outbound", (("rules", "reject", "forbidden attachment", 0.0),), "rejected"
)


class Delivered:
    name = "test"

    def __init__(self) -> None:
        self.deliveries: list[Any] = []

    def deliver(self, delivery: Any) -> Deferred[list[RecipientResult]]:
        self.deliveries.append(delivery)
        return succeed([RecipientResult(r, 250, "2.0.0", "ok", "sink") for r in delivery.recipients])


class Gateway:
    def __init__(self, directory: Path) -> None:
        self.now = NOW
        self.spool = MemorySpool(directory=str(directory), now=lambda: self.now)
        self.transport = Delivered()
        self.manager = QueueManager(
            self.spool,
            Router(()),
            lambda route: self.transport,
            lambda m, f: succeed(None),
            DeliveryConfig(),
            Clock(),
        )
        self.spool.subscribe(self.manager.wake)
        self.trained: list[tuple[bytes, bool]] = []
        self.room = QuarantineRoom(self.spool, self.manager, retention=30 * DAY, trainer=self.train)

    def train(self, message: bytes, spam: bool) -> Deferred[None]:
        self.trained.append((message, spam))
        return succeed(None)

    def hold(self, record: Quarantine | None, to: str = "bob@example.com", subject: str = "offer") -> str:
        message = self.spool.new_message()
        message.write(f"From: alice@partner.test\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
        envelope = Envelope("alice@partner.test", (Recipient(to),))
        if record is None:
            queue_id: str = fired(message.commit(envelope, Session("192.0.2.1"), hold=True))
        else:
            queue_id = fired(message.commit(envelope, Session("192.0.2.1"), quarantine=record))
        return queue_id


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    yield Gateway(tmp_path)


def ids(room: QuarantineRoom, selection: Selection | None = None) -> list[str]:
    return [m.queue_id for m in room.messages(selection or Selection())]


def test_lists_what_filters_held_and_not_the_operators_holds(gateway: Gateway) -> None:
    virus = gateway.hold(VIRUS)
    gateway.hold(None)  # mailgatectl queue hold: not the quarantine's
    gateway.now += 10
    spam = gateway.hold(SPAM, to="carol@example.com", subject="=?utf-8?q?r=C3=A9duction?=")
    assert ids(gateway.room) == [virus, spam]
    row = gateway.room.row(gateway.spool.load(spam))
    assert row["subject"] == "réduction"
    assert (row["reason"], row["score"], row["kind"]) == ("bayes 8.2", 8.2, "quarantine")
    assert row["recipients"] == ["carol@example.com"]


def test_selections_by_date_recipient_reason_and_kind(gateway: Gateway) -> None:
    virus = gateway.hold(VIRUS)
    gateway.now += DAY
    spam = gateway.hold(SPAM, to="carol@example.com")
    rejected = gateway.hold(REJECTED)
    assert ids(gateway.room, Selection(since=NOW + 1)) == [spam, rejected]
    assert ids(gateway.room, Selection(until=NOW + 1)) == [virus]
    assert ids(gateway.room, Selection(recipient="CAROL")) == [spam]
    assert ids(gateway.room, Selection(reason="eicar")) == [virus]
    assert ids(gateway.room, Selection(reason="clamav")) == [virus]  # a filter's name matches too
    assert ids(gateway.room, Selection(kind="rejected")) == [rejected]


def test_release_delivers_without_the_filters_and_leaves_the_quarantine(gateway: Gateway) -> None:
    queue_id = gateway.hold(SPAM)
    fired(gateway.room.release(queue_id))
    gateway.manager.clock.advance(1)  # type: ignore[attr-defined]
    assert [d.queue_id for d in gateway.transport.deliveries] == [queue_id]
    assert ids(gateway.room) == []
    with pytest.raises(KeyError):
        gateway.room.release(queue_id)


def test_an_operator_hold_cannot_be_released_or_deleted_as_quarantine(gateway: Gateway) -> None:
    held = gateway.hold(None)
    with pytest.raises(KeyError, match="not in the quarantine"):
        gateway.room.delete(held)
    assert gateway.spool.load(held).state == "hold"


def test_train_spam_learns_then_deletes_and_train_ham_learns_then_delivers(gateway: Gateway) -> None:
    spam, ham = gateway.hold(SPAM), gateway.hold(SPAM, subject="minutes of the meeting")
    fired(gateway.room.train(spam, spam=True))
    fired(gateway.room.train(ham, spam=False))
    gateway.manager.clock.advance(1)  # type: ignore[attr-defined]
    assert [(b"Subject: offer" in m, s) for m, s in gateway.trained] == [(True, True), (False, False)]
    assert spam not in gateway.spool.messages
    assert [d.queue_id for d in gateway.transport.deliveries] == [ham]


def test_training_without_bayes_says_so(gateway: Gateway) -> None:
    room = QuarantineRoom(gateway.spool, gateway.manager)
    with pytest.raises(ValueError, match="no Bayes"):
        room.train(gateway.hold(SPAM), spam=True)


def test_expiry_deletes_only_what_is_older_than_the_retention(gateway: Gateway) -> None:
    old = gateway.hold(VIRUS)
    gateway.now += 20 * DAY
    young = gateway.hold(SPAM)
    operator = gateway.hold(None)
    gateway.now += 11 * DAY
    assert fired(gateway.room.expire(gateway.now)) == 1
    assert old not in gateway.spool.messages
    assert {young, operator} <= set(gateway.spool.messages)


def test_the_daily_notice_lists_the_last_days_quarantine_to_the_postmaster(gateway: Gateway) -> None:
    gateway.hold(VIRUS, subject="old news")
    gateway.now += 2 * DAY
    spam = gateway.hold(SPAM, subject="cheap pills")
    outbox = RecordingOutbox("postmaster@example.com")
    clock = Clock()
    service = QuarantineService(
        gateway.room, outbox, "gw.example.com", notice_time="08:00", clock=clock, now=lambda: gateway.now
    )
    gateway.now += 3600
    fired(service.send_notice())
    [(sender, recipients, message)] = outbox.sent
    assert (sender, recipients) == ("", ("postmaster@example.com",))
    text = message.decode()
    assert "Subject: Quarantine: 1 message(s) held in the last day" in text
    assert spam in text and "cheap pills" in text and "old news" not in text
    assert "Auto-Submitted: auto-generated" in text
    outbox.sent.clear()
    gateway.now += 2 * DAY
    fired(service.send_notice())
    assert outbox.sent == []  # nothing held in the last day: no notice


def test_the_service_expires_at_start_and_sends_the_notice_at_its_time(gateway: Gateway) -> None:
    gateway.hold(VIRUS)
    gateway.now += 31 * DAY
    fresh = gateway.hold(SPAM)
    outbox = RecordingOutbox()
    clock = Clock()
    clock.advance(gateway.now)
    service = QuarantineService(
        gateway.room, outbox, "gw.example.com", notice_time="08:00", clock=clock, now=lambda: clock.seconds()
    )
    service.startService()
    assert ids(gateway.room) == [fresh]  # expired at once
    clock.advance(seconds_until("08:00", clock.seconds()))
    assert len(outbox.sent) == 1
    clock.advance(DAY)
    assert len(outbox.sent) == 1  # the next day nothing new was held
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_seconds_until_the_next_notice_time() -> None:
    morning = time.mktime((2026, 11, 23, 7, 30, 0, 0, 0, -1))
    assert seconds_until("08:00", morning) == 1800
    assert seconds_until("07:30", morning) == DAY  # just past: tomorrow


def test_control_socket_quarantine_commands(gateway: Gateway) -> None:
    virus = gateway.hold(VIRUS)
    spam = gateway.hold(SPAM)
    transport = StringTransport()
    protocol = ControlFactory(gateway.manager, gateway.spool, quarantine=gateway.room).buildProtocol(None)
    protocol.makeConnection(transport)

    def ask(**request: object) -> Any:
        transport.clear()
        protocol.dataReceived(json.dumps(request).encode() + b"\n")
        return json.loads(transport.value())

    listed = ask(command="quarantine.list", reason="bayes")
    assert [row["queue_id"] for row in listed["result"]] == [spam]
    shown = ask(command="quarantine.show", id=virus)["result"]
    assert shown["hits"] == [
        {"filter": "clamav", "action": "quarantine", "reason": "virus Eicar-Signature", "score": 0.0}
    ]
    assert "Subject: offer" in shown["text"]
    assert ask(command="quarantine.delete", id=virus) == {"ok": True, "result": virus}
    assert ask(command="quarantine.train", id=spam, spam=True) == {"ok": True, "result": spam}
    assert gateway.trained and gateway.spool.messages == {}
    answer = ask(command="quarantine.release", id=virus)
    assert answer == {"ok": False, "error": f"no such message: {virus!r}"}
