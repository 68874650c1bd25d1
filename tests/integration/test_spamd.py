"""The spamd client and the spamassassin filter against a real spamd (peer_spamd.Spamd).

GTUBE scores 1000 and more; a plain note does not; TELL trains (spamd runs with
--allow-tell); the answers have the shape of the transcripts the unit tests replay.
A spamd that hangs times out, one killed with a request in flight fails the check,
and the message is deferred, never passed as clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet import reactor

from gateway.filters.chain import ChainRunner, Link, failure_verdict
from gateway.filters.spamassassin import SpamAssassin
from gateway.model import Direction, Envelope, Recipient, Session
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.scanners import ScannerProtocolError, ScannerTimeout, ScannerUnavailable
from gateway.scanners._connection import client_endpoint
from gateway.scanners.spamd import SpamdClient, SpamdProtocol, request
from gateway.smtp.reply import Reply
from tests.integration.peer_spamd import GTUBE, Spamd
from tests.integration.peers import free_port, require_program
from tests.integration.turning import wait
from tests.unit.reception_driver import config
from tests.unit.test_spamd import SYMBOLS_SPAM

pytestmark = pytest.mark.integration

CLIENT = Session("192.0.2.10", helo="mail.partner.test")
SPAM = (
    b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: test\r\nMessage-ID: <1@example.com>\r\n\r\n"
    + GTUBE
    + b"\r\n"
)
HAM = (
    b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: lunch\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <lunch.1234@partner.test>\r\n\r\n"
    b"Hi Bob, lunch tomorrow at noon?\r\n"
)


def spin(seconds: float) -> None:
    """Let the reactor work for a while (requests are written out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
        reactor.doIteration(0.01)  # type: ignore[attr-defined]


def deliver(
    content_filter: Any, message: bytes, *, recipients: tuple[str, ...] = ("bob@example.com",)
) -> Any:
    """One message through the real reception whose inbound chain is `content_filter` (on_failure
    defer, 30 s); (the end-of-data reply, the spool)."""
    link = Link(content_filter, 30.0, failure_verdict("defer", content_filter.name))
    spool = MemorySpool()
    reception = Reception(spool, config("").relay, ChainRunner({Direction.INBOUND: (link,)}, reactor))
    checks = reception.open_session(CLIENT)
    envelope = Envelope("a@partner.test", ())
    assert wait(checks.mail(CLIENT, envelope)) is None
    for address in recipients:
        assert wait(checks.rcpt(CLIENT, envelope, Recipient(address))) is None
        envelope = attrs.evolve(envelope, rcpt_to=(*envelope.rcpt_to, Recipient(address)))
    incoming = checks.new_message(CLIENT)
    incoming.write(message)
    reply: Reply = wait(checks.accept(CLIENT, envelope, incoming))
    checks.close()
    return reply, spool


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    require_program("spamd")
    peer = Spamd()
    peer.start(timeout=90)  # perl compiles its rules: a few seconds
    yield peer
    peer.stop()


@pytest.fixture
def fresh_spamd() -> Iterator[Spamd]:
    """A spamd of this test's own, for the tests that pause or kill it."""
    require_program("spamd")
    peer = Spamd()
    peer.start(timeout=90)
    yield peer
    peer.stop()


def client(endpoint: str, **options: Any) -> SpamdClient:
    return SpamdClient(client_endpoint(reactor, endpoint), reactor, address=endpoint, **options)


def test_gtube_is_spam_with_its_rule(spamd: Spamd) -> None:
    found = wait(client(spamd.endpoint).symbols(SPAM))
    assert found.spam
    assert found.score >= 1000
    assert "GTUBE" in found.symbols
    checked = wait(client(spamd.endpoint).check(SPAM, "CHECK"))
    assert (checked.spam, checked.score, checked.symbols) == (True, found.score, ())
    report = wait(client(spamd.endpoint).report(SPAM)).report
    assert "GTUBE" in report and "Content analysis details" in report


def test_a_plain_note_is_not_spam(spamd: Spamd) -> None:
    found = wait(client(spamd.endpoint).symbols(HAM))
    assert not found.spam
    assert found.score < 5


def test_the_real_answer_has_the_shape_of_the_recorded_transcript(spamd: Spamd) -> None:
    """Contract: what tests/unit/test_spamd.py replays is what this spamd says."""
    protocol = SpamdProtocol(request("SYMBOLS", SPAM))
    wait(client(spamd.endpoint).connections.exchange(protocol))
    real = bytes(protocol.buffer)
    recorded = SYMBOLS_SPAM
    assert real.split(b"\r\n")[0] == recorded.split(b"\r\n")[0] == b"SPAMD/1.1 0 EX_OK"
    names = [line.split(b":")[0] for line in real.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]]
    assert names == [line.split(b":")[0] for line in recorded.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]]
    assert b"Spam: True ; " in real


def test_tell_trains_and_forgets(spamd: Spamd) -> None:
    spamc = client(spamd.endpoint)
    message = SPAM.replace(b"<1@example.com>", b"<tell-%d@example.com>" % time.monotonic_ns())
    assert wait(spamc.tell(message, "spam")).did_set == ("local",)
    assert wait(spamc.tell(message, "spam")).did_set == ()  # learnt already
    assert wait(spamc.tell(message, "spam", remove=True)).did_remove == ("local",)
    assert wait(spamc.tell(HAM, "ham")).did_set == ("local",)


def test_ping_and_a_refused_request(spamd: Spamd) -> None:
    assert wait(client(spamd.endpoint).ping()) == "PONG"
    protocol = SpamdProtocol(b"FOO SPAMC/1.5\r\n\r\n")
    with pytest.raises(ScannerProtocolError, match=r"refused the request: SPAMD/1\.0 76 Bad header"):
        wait(client(spamd.endpoint).connections.exchange(protocol))


def test_several_at_once_through_a_limit_of_one(spamd: Spamd) -> None:
    spamc = client(spamd.endpoint, max_connections=1)
    answers = [spamc.symbols(SPAM if n % 2 else HAM) for n in range(4)]
    assert spamc.connections.busy == 1 and spamc.connections.waiting == 3
    assert [wait(answer).spam for answer in answers] == [False, True, False, True]


def test_the_filter_discards_gtube_and_passes_a_note(spamd: Spamd) -> None:
    spam_filter = SpamAssassin(client(spamd.endpoint))
    reply, spool = deliver(spam_filter, SPAM)
    assert reply.code == 250 and spool.messages == {}  # score >= 12: discarded
    reply, spool = deliver(spam_filter, HAM)
    assert reply.code == 250 and len(spool.messages) == 1
    rejecting = SpamAssassin(client(spamd.endpoint), delete_action="reject")
    reply, _ = deliver(rejecting, SPAM)
    assert reply.code == 554 and "SpamAssassin score 100" in reply.text


def test_the_filter_tags_between_the_thresholds(spamd: Spamd) -> None:
    tagging = SpamAssassin(client(spamd.endpoint), spam_score=5, delete_score=5000)
    reply, spool = deliver(tagging, SPAM)
    assert reply.code == 250
    [queue_id] = spool.messages
    stored = spool.message_bytes(queue_id)
    assert b"Subject: SPAM*** test\r\n" in stored
    assert b"X-Mailgate-SpamAssassin: score=100" in stored and b"GTUBE" in stored


def test_spamd_down_defers() -> None:
    closed = f"tcp:127.0.0.1:{free_port()}"
    with pytest.raises(ScannerUnavailable, match="cannot connect to spamd"):
        wait(client(closed).symbols(SPAM))
    reply, spool = deliver(SpamAssassin(client(closed)), SPAM)
    assert reply.code == 451 and spool.messages == {}


def test_spamd_hung_times_out_without_hanging(spamd: Spamd) -> None:
    spamd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ScannerTimeout, match="no answer within 2 s"):
            wait(client(spamd.endpoint, timeout=2.0).symbols(SPAM), timeout=10)
        assert time.monotonic() - started < 5
        reply, _ = deliver(SpamAssassin(client(spamd.endpoint, timeout=2.0)), SPAM)
        assert reply.code == 451
    finally:
        spamd.resume()
    assert wait(client(spamd.endpoint).ping()) == "PONG"  # and it serves again


def test_spamd_killed_with_requests_in_flight_fails_them_and_defers(fresh_spamd: Spamd) -> None:
    spamc = client(fresh_spamd.endpoint, max_connections=4, timeout=60)
    spam_filter = SpamAssassin(spamc)
    fresh_spamd.pause()  # requests go out and wait, unanswered
    in_flight = [spamc.symbols(SPAM), spamc.symbols(HAM)]
    link = Link(spam_filter, 60.0, failure_verdict("defer", "spamassassin"))
    spool = MemorySpool()
    reception = Reception(spool, config("").relay, ChainRunner({Direction.INBOUND: (link,)}, reactor))
    checks = reception.open_session(CLIENT)
    envelope = Envelope("a@partner.test", (Recipient("bob@example.com"),))
    incoming = checks.new_message(CLIENT)
    incoming.write(SPAM)
    ending = checks.accept(CLIENT, envelope, incoming)
    spin(0.5)
    assert spamc.connections.busy == 3
    started = time.monotonic()
    fresh_spamd.kill()
    for answer in in_flight:
        with pytest.raises(ScannerUnavailable):
            wait(answer, timeout=10)
    reply = wait(ending, timeout=10)
    assert reply.code == 451
    assert spool.messages == {}
    assert time.monotonic() - started < 10  # failed at once, not by a timeout
    assert spamc.connections.busy == 0
