"""The ISpool contract, run against DirectorySpool and its fake MemorySpool alike."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from gateway.interfaces import IIncomingMessage, ISpool
from gateway.model import (
    Body,
    Envelope,
    Notify,
    Quarantine,
    QueuedMessage,
    Recipient,
    RecipientStatus,
    Ret,
    Session,
)
from gateway.queue import open_message
from gateway.queue._ids import is_queue_id
from gateway.queue.memory import MemorySpool
from gateway.queue.spool import DirectorySpool, SpoolError
from gateway.queue.testing import PumpedReactor

T = TypeVar("T")

ENVELOPE = Envelope(
    mail_from="alice@example.org",
    rcpt_to=(
        Recipient("bob@example.com", frozenset({Notify.FAILURE, Notify.DELAY}), "rfc822;bob@example.com"),
        Recipient("carol@example.net"),
    ),
    body=Body.EIGHT_BIT,
    ret=Ret.HDRS,
    envid="QQ314159",
    size=1234,
)
SESSION = Session(peer_host="192.0.2.7", peer_port=40000, helo="client.example.org", esmtp=True)


@attrs.define
class SpoolCase:
    """A spool under test, how to wait for its Deferreds, and how to 'restart' it."""

    spool: Any
    wait_for: Callable[[Deferred[Any]], Any]
    restart: Callable[[], Any]
    kind: str

    def wait(self, deferred: Deferred[T]) -> T:
        result: T = self.wait_for(deferred)
        return result

    def store(self, content: bytes = b"Subject: hi\r\n\r\nhello\r\n", envelope: Envelope = ENVELOPE) -> str:
        message = self.spool.new_message()
        message.write(content)
        queue_id: str = self.wait(message.commit(envelope, SESSION))
        return queue_id


def _memory_wait(deferred: Deferred[T]) -> T:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "a MemorySpool Deferred should have fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    result: T = outcome[0]
    return result


@pytest.fixture(params=["directory", "memory"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpoolCase]:
    if request.param == "memory":
        memory = MemorySpool()
        yield SpoolCase(memory, _memory_wait, lambda: memory, "memory")
        return
    reactor = PumpedReactor()
    spools: list[DirectorySpool] = []

    def start() -> DirectorySpool:
        if spools:
            reactor.wait(spools[-1].stop())
        spool = DirectorySpool(str(tmp_path / "spool"), reactor=reactor, memory_limit=4096)
        spools.append(spool)
        reactor.wait(spool.recover())
        return spool

    current = SpoolCase(start(), reactor.wait, lambda: None, "directory")

    def restart() -> DirectorySpool:
        current.spool = start()
        return current.spool

    current.restart = restart
    yield current
    reactor.wait(spools[-1].stop())


def test_provides_the_interfaces(case: SpoolCase) -> None:
    assert verifyObject(ISpool, case.spool)
    assert verifyObject(IIncomingMessage, case.spool.new_message())


def test_commit_stores_the_message_in_incoming(case: SpoolCase) -> None:
    woken: list[str] = []
    case.spool.subscribe(woken.append)
    message = case.spool.new_message()
    message.write(b"Received: by gateway\r\n")
    message.write(b"Subject: hi\r\n\r\nhello\r\n")
    assert message.size == 44
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    assert queue_id == message.queue_id
    assert woken == [queue_id]
    loaded = case.spool.load(queue_id)
    assert loaded.queue_id == queue_id
    assert loaded.envelope == ENVELOPE
    assert loaded.state == "incoming"
    assert loaded.size == 44
    assert loaded.client == "unknown[192.0.2.7]"
    assert [r.recipient for r in loaded.recipients] == list(ENVELOPE.rcpt_to)
    assert all(r.status is RecipientStatus.PENDING and r.attempts == 0 for r in loaded.recipients)
    assert case.spool.list("incoming") == [queue_id]
    assert case.spool.message_bytes(queue_id) == b"Received: by gateway\r\nSubject: hi\r\n\r\nhello\r\n"
    assert case.spool.find(queue_id) == "incoming"


def test_queue_ids_are_unique_well_formed_and_sorted_by_time(case: SpoolCase) -> None:
    ids = [case.spool.new_message().queue_id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_queue_id(queue_id) and len(queue_id) == 17 for queue_id in ids)


def test_a_large_message_comes_back_intact(case: SpoolCase) -> None:
    content = b"".join(b"line %06d of a long message\r\n" % n for n in range(40_000))  # ~1.2 MB
    message = case.spool.new_message()
    for start in range(0, len(content), 65536):
        message.write(content[start : start + 65536])
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    assert case.spool.message_bytes(queue_id) == content
    assert case.spool.load(queue_id).size == len(content)


def test_an_aborted_message_leaves_nothing(case: SpoolCase) -> None:
    message = case.spool.new_message()
    message.write(b"x" * 10_000)
    message.abort()
    assert case.spool.list("incoming") == []
    with pytest.raises(KeyError):
        case.spool.load(message.queue_id)


def test_a_finished_message_refuses_more(case: SpoolCase) -> None:
    message = case.spool.new_message()
    message.write(b"hello\r\n")
    case.wait(message.commit(ENVELOPE, SESSION))
    with pytest.raises(SpoolError):
        message.write(b"more")
    with pytest.raises(SpoolError):
        case.wait(message.commit(ENVELOPE, SESSION))


def test_update_records_recipient_states_and_moves_between_states(case: SpoolCase) -> None:
    queue_id = case.store()
    message = case.spool.load(queue_id)
    first, second = message.recipients
    updated = attrs.evolve(
        message,
        recipients=(
            attrs.evolve(first, status=RecipientStatus.DELIVERED, attempts=1, last_reply="250 2.0.0 Ok"),
            attrs.evolve(
                second, attempts=1, last_reply="451 4.7.1 try later", relay="mx.example.net[192.0.2.9]:25"
            ),
        ),
        attempts=1,
        next_attempt=1234567.5,
        state="deferred",
    )
    case.wait(case.spool.update(updated))
    assert case.spool.load(queue_id) == updated
    assert case.spool.list("incoming") == []
    assert case.spool.list("deferred") == [queue_id]
    assert case.spool.message_bytes(queue_id) == b"Subject: hi\r\n\r\nhello\r\n"
    case.wait(case.spool.update(attrs.evolve(updated, state="hold")))
    assert case.spool.list("deferred") == []
    assert case.spool.list("hold") == [queue_id]
    case.restart()
    assert case.spool.load(queue_id) == attrs.evolve(updated, state="hold")


def test_updates_and_removal_issued_at_once_apply_in_order(case: SpoolCase) -> None:
    queue_id = case.store()
    message = case.spool.load(queue_id)
    pending = [
        case.spool.update(attrs.evolve(message, state="deferred", attempts=1)),
        case.spool.update(attrs.evolve(message, state="hold", attempts=2)),
        case.spool.update(attrs.evolve(message, state="deferred", attempts=3)),
    ]
    for deferred in pending:
        case.wait(deferred)
    assert case.spool.load(queue_id).attempts == 3
    assert case.spool.list("deferred") == [queue_id]
    assert case.spool.list("hold") == []
    last = [case.spool.update(attrs.evolve(message, state="hold")), case.spool.remove(queue_id)]
    for deferred in last:
        case.wait(deferred)
    assert all(case.spool.list(state) == [] for state in ("incoming", "deferred", "hold"))


def test_remove_forgets_the_message(case: SpoolCase) -> None:
    queue_id = case.store()
    keep = case.store()
    case.wait(case.spool.remove(queue_id))
    with pytest.raises(KeyError):
        case.spool.load(queue_id)
    with pytest.raises(KeyError):
        case.spool.message_bytes(queue_id)
    assert case.spool.list("incoming") == [keep]
    case.restart()
    assert case.spool.list("incoming") == [keep]


def test_unknown_and_malformed_ids_are_key_errors(case: SpoolCase) -> None:
    for bad in ("0000000000000000A", "../../../etc/passwd", "", "deferred"):
        with pytest.raises(KeyError):
            case.spool.load(bad)
    for bad in ("../../etc/passwd", "a/b"):
        with pytest.raises(KeyError):
            case.spool.message_path(bad)
        with pytest.raises(KeyError):
            case.wait(case.spool.remove(bad))
    unknown = case.spool.new_message().queue_id
    with pytest.raises(KeyError):
        case.spool.load(unknown)
    with pytest.raises(KeyError):
        case.wait(case.spool.update(_message(unknown)))


def test_list_refuses_an_unknown_state(case: SpoolCase) -> None:
    with pytest.raises(ValueError):
        case.spool.list("nowhere")
    queue_id = case.store()
    with pytest.raises(ValueError):
        case.wait(case.spool.update(attrs.evolve(case.spool.load(queue_id), state="nowhere")))


def test_recover_requeues_active_messages(case: SpoolCase) -> None:
    active = case.store()
    deferred = case.store()
    fresh = case.store()
    case.wait(case.spool.update(attrs.evolve(case.spool.load(active), state="active")))
    case.wait(case.spool.update(attrs.evolve(case.spool.load(deferred), state="deferred")))
    assert case.spool.list("active") == [active]
    spool = case.restart()
    if case.kind == "memory":
        assert case.wait(spool.recover()) == 1
    else:
        assert spool.recovery.requeued == 1
    assert spool.list("active") == []
    assert spool.list("incoming") == [active, fresh]
    assert spool.list("deferred") == [deferred]
    assert spool.load(active).state == "incoming"


def test_many_concurrent_commits_are_all_stored(case: SpoolCase) -> None:
    pending = []
    contents = {}
    for n in range(200):
        message = case.spool.new_message()
        contents[message.queue_id] = content = b"Subject: %d\r\n\r\n" % n + os.urandom(n * 50)
        message.write(content)
        pending.append(message.commit(ENVELOPE, SESSION))
    ids = [case.wait(deferred) for deferred in pending]
    assert sorted(ids) == sorted(contents) == case.spool.list("incoming")
    for queue_id, content in contents.items():
        assert case.spool.message_bytes(queue_id) == content


def test_a_failing_subscriber_does_not_fail_the_commit(case: SpoolCase) -> None:
    def broken(queue_id: str) -> None:
        raise RuntimeError("boom")

    seen: list[str] = []
    case.spool.subscribe(broken)
    unsubscribe = case.spool.subscribe(seen.append)
    queue_id = case.store()
    assert seen == [queue_id]
    unsubscribe()
    case.store()
    assert seen == [queue_id]


def _message(queue_id: str) -> QueuedMessage:
    return QueuedMessage(queue_id=queue_id, envelope=ENVELOPE, recipients=(), arrived=0.0, size=0)


@pytest.mark.parametrize("body_size", [100, 20_000])  # in memory, and spilled to disk (limit 4096)
def test_headers_added_at_the_end_go_after_the_first_write(case: SpoolCase, body_size: int) -> None:
    message = case.spool.new_message()
    message.write(b"Received: by gateway\r\nX-Mailgate-Filters: dnsbl=tag\r\n")
    body = b"Subject: hi\r\n\r\n" + b"x" * body_size + b"\r\n"
    for start in range(0, len(body), 1000):  # as the SMTP server writes: chunk after chunk
        message.write(body[start : start + 1000])
    message.add_headers(b"X-Spam-Flag: YES\r\n")
    message.add_headers(b"X-Mailgate-Score: 7.5\r\n")
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    if case.kind == "memory":
        stored = case.spool.contents[queue_id]
    else:
        with open_message(case.spool.message_path(queue_id)) as handle:
            stored = handle.read()
    assert stored == (
        b"Received: by gateway\r\nX-Mailgate-Filters: dnsbl=tag\r\n"
        b"X-Spam-Flag: YES\r\nX-Mailgate-Score: 7.5\r\n" + body
    )
    assert case.spool.load(queue_id).size == len(stored)


def test_held_messages_wait_in_hold_and_wake_nobody(case: SpoolCase) -> None:
    woken: list[str] = []
    case.spool.subscribe(woken.append)
    message = case.spool.new_message()
    message.write(b"Subject: quota\r\n\r\nx\r\n")
    queue_id = case.wait(message.commit(ENVELOPE, SESSION, hold=True))
    assert woken == []
    assert queue_id in case.spool.list("hold")
    assert case.spool.load(queue_id).state == "hold"


def _stored(case: SpoolCase, queue_id: str) -> bytes:
    if case.kind == "memory":
        stored: bytes = case.spool.contents[queue_id]
        return stored
    with open_message(case.spool.message_path(queue_id)) as handle:
        return handle.read()


@pytest.mark.parametrize("body_size", [100, 20_000])  # in memory, and spilled to disk (limit 4096)
def test_the_end_of_data_filters_read_what_was_written(case: SpoolCase, body_size: int) -> None:
    message = case.spool.new_message()
    content = b"Received: by gateway\r\nSubject: hi\r\n\r\n" + b"y" * body_size + b"\r\n"
    for start in range(0, len(content), 1000):
        message.write(content[start : start + 1000])
    with message.open() as first, message.open() as second:
        assert first.read() == content
        assert second.read(8) == b"Received"
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    assert _stored(case, queue_id) == content


@pytest.mark.parametrize("body_size", [100, 20_000])
def test_a_spam_tag_goes_in_front_of_the_subject_once(case: SpoolCase, body_size: int) -> None:
    message = case.spool.new_message()
    message.write(b"Received: by gateway\r\n")
    body = b"From: a@example.org\r\nsubject:  Cheap pills\r\n\r\n" + b"z" * body_size + b"\r\n"
    for start in range(0, len(body), 1000):
        message.write(body[start : start + 1000])
    message.add_headers(b"X-Mailgate-Score: 9\r\n")
    message.prefix_subject("SPAM*** ")
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    stored = _stored(case, queue_id)
    assert stored.startswith(
        b"Received: by gateway\r\nX-Mailgate-Score: 9\r\n"
        b"From: a@example.org\r\nsubject:  SPAM*** Cheap pills\r\n\r\n"
    )
    assert stored.endswith(b"z" * body_size + b"\r\n")
    assert case.spool.load(queue_id).size == len(stored)
    case.restart()
    assert case.spool.load(queue_id).size == len(stored)
    assert _stored(case, queue_id) == stored


def test_a_spam_tag_on_a_message_without_subject_adds_one(case: SpoolCase) -> None:
    message = case.spool.new_message()
    message.write(b"Received: by gateway\r\nFrom: a@example.org\r\n\r\nbody\r\n")
    message.prefix_subject("SPAM*** ")
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    assert _stored(case, queue_id) == (
        b"Received: by gateway\r\nFrom: a@example.org\r\nSubject: SPAM***\r\n\r\nbody\r\n"
    )


def test_a_subject_tagged_already_is_not_tagged_twice(case: SpoolCase) -> None:
    message = case.spool.new_message()
    message.write(b"Subject: SPAM*** offer\r\n\r\nbody\r\n")
    message.prefix_subject("SPAM*** ")
    queue_id = case.wait(message.commit(ENVELOPE, SESSION))
    assert _stored(case, queue_id) == b"Subject: SPAM*** offer\r\n\r\nbody\r\n"


def test_a_quarantined_message_is_held_with_its_record_across_a_restart(case: SpoolCase) -> None:
    record = Quarantine(
        reason="virus Eicar-Signature",
        direction="inbound",
        hits=(("dnsbl", "tag", "listed", 2.0), ("clamav", "quarantine", "virus Eicar-Signature", 0.0)),
    )
    woken: list[str] = []
    case.spool.subscribe(woken.append)
    message = case.spool.new_message()
    message.write(b"Subject: x\r\n\r\nx\r\n")
    queue_id = case.wait(message.commit(ENVELOPE, SESSION, quarantine=record))
    assert woken == []
    assert case.spool.list("hold") == [queue_id]
    case.restart()
    stored = case.spool.load(queue_id)
    assert stored.quarantine == record
    assert stored.quarantine.score == 2.0
    # an update (an operator's release, say) keeps or clears it as told
    case.wait(case.spool.update(attrs.evolve(stored, state="deferred", quarantine=None)))
    case.restart()
    assert case.spool.load(queue_id).quarantine is None


def test_states_gives_every_message_and_its_state_across_a_restart(case: SpoolCase) -> None:
    fresh, deferred = case.store(), case.store()
    case.wait(case.spool.update(attrs.evolve(case.spool.load(deferred), state="deferred", attempts=1)))
    message = case.spool.new_message()
    message.write(b"Subject: x\r\n\r\nx\r\n")
    held = case.wait(message.commit(ENVELOPE, SESSION, hold=True))
    expected = {fresh: "incoming", deferred: "deferred", held: "hold"}
    assert case.spool.states() == expected
    case.restart()
    assert case.spool.states() == expected
    assert [case.spool.list(state) for state in ("incoming", "deferred", "hold")] == [
        [fresh],
        [deferred],
        [held],
    ]
