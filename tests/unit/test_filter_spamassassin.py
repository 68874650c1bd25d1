"""The spamassassin filter: spamd's score decides (spam 8 tags, 12 deletes); a broken spamd defers.

spamd is played by recorded answers (tests/unit/test_spamd.py) over an in-memory
endpoint; the filter runs in the real reception and chain (tests/unit/reception_driver.py).
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import ConfigError
from gateway.filters import FilterServices
from gateway.filters.chain import ChainRunner, Link, failure_verdict
from gateway.filters.spamassassin import SpamAssassin
from gateway.interfaces import IFilter
from gateway.model import Action, Direction, Envelope, Recipient, Session, Stage
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.scanners.spamd import SpamdClient
from gateway.scanners.testing import MemoryEndpoint
from gateway.smtp.reply import Reply
from tests.unit.reception_driver import config
from tests.unit.test_spamd import SYMBOLS_SPAM, result

CLIENT = Session("192.0.2.10", helo="mail.partner.test")
MESSAGE = b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: offer\r\n\r\nBuy now\r\n"


def symbols(score: float, rules: str = "BAYES_99,URIBL_BLACK") -> bytes:
    """spamd's SYMBOLS answer with this score (as recorded, numbers changed)."""
    body = rules.encode()
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s ; %s / 5.0\r\n\r\n%s" % (
        len(body),
        b"True" if score >= 5 else b"False",
        f"{score:g}".encode(),
        body,
    )


def spamassassin(
    script: list[Any], clock: Clock | None = None, **options: Any
) -> tuple[SpamAssassin, MemoryEndpoint]:
    endpoint = MemoryEndpoint(script=script)
    client = SpamdClient(endpoint, clock or Clock(), address="tcp:127.0.0.1:783")
    return SpamAssassin(client, **options), endpoint


def settled(answer: Any) -> Any:
    """A verdict or reply, or the result of a Deferred that has fired (its failure raised)."""
    return result(answer) if isinstance(answer, Deferred) else answer


@attrs.define
class Delivered:
    """The end-of-data reply and what the spool holds afterwards."""

    reply: Reply
    spool: MemorySpool

    def queued(self) -> bytes:
        [queue_id] = self.spool.messages
        return self.spool.message_bytes(queue_id)

    def states(self) -> list[str]:
        return [self.spool.load(queue_id).state for queue_id in sorted(self.spool.messages)]


def deliver(
    content_filter: Any,
    message: bytes = MESSAGE,
    *,
    on_failure: str = "defer",
    sender: str = "a@partner.test",
    recipients: tuple[str, ...] = ("bob@example.com",),
    session: Session = CLIENT,
) -> Delivered:
    """One message through the real reception, whose inbound chain is this filter alone."""
    link = Link(content_filter, 30.0, failure_verdict(on_failure, content_filter.name))
    spool = MemorySpool()
    reception = Reception(spool, config("").relay, ChainRunner({Direction.INBOUND: (link,)}, Clock()))
    checks = reception.open_session(session)
    envelope = Envelope(sender, ())
    assert settled(checks.mail(session, envelope)) is None
    for address in recipients:
        assert settled(checks.rcpt(session, envelope, Recipient(address))) is None
        envelope = attrs.evolve(envelope, rcpt_to=(*envelope.rcpt_to, Recipient(address)))
    incoming = checks.new_message(session)
    incoming.write(message)
    reply = settled(checks.accept(session, envelope, incoming))
    checks.close()
    assert reply is not None
    return Delivered(reply, spool)


def test_provides_filter_at_data() -> None:
    spam_filter, _ = spamassassin([])
    assert verifyObject(IFilter, spam_filter)
    assert spam_filter.stages == frozenset({Stage.DATA})


def test_the_message_goes_to_spamd_as_received() -> None:
    spam_filter, endpoint = spamassassin([symbols(1.0)])
    assert deliver(spam_filter).reply.code == 250
    [sent] = endpoint.requests()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"SYMBOLS SPAMC/1.5\r\nContent-length: ")
    assert body.endswith(MESSAGE)  # our Received header, if any, comes first
    assert int(head.split(b"Content-length: ")[1]) == len(body)


def test_below_the_spam_score_the_message_passes_untouched() -> None:
    spam_filter, _ = spamassassin([symbols(7.9)])
    delivered = deliver(spam_filter)
    assert delivered.reply.code == 250
    stored = delivered.queued()
    assert b"Subject: offer\r\n" in stored
    assert b"X-Mailgate-SpamAssassin" not in stored
    assert delivered.states() == ["incoming"]  # queued as it is, not held


def test_from_the_spam_score_the_subject_is_tagged_with_score_and_rules() -> None:
    spam_filter, _ = spamassassin([symbols(8.0)])
    delivered = deliver(spam_filter)
    assert delivered.reply.code == 250
    stored = delivered.queued()
    assert b"Subject: SPAM*** offer\r\n" in stored
    assert b"X-Mailgate-SpamAssassin: score=8 required=8 tests=BAYES_99,URIBL_BLACK\r\n" in stored
    assert b"spamassassin=tag score=8" in stored  # the hit, with SpamAssassin's score


def test_from_the_delete_score_the_message_is_discarded() -> None:
    spam_filter, _ = spamassassin([SYMBOLS_SPAM])  # GTUBE: 1002.7
    delivered = deliver(spam_filter)
    assert delivered.reply.code == 250  # accepted, and dropped
    assert delivered.spool.messages == {}
    verdict = settled(spamassassin([symbols(12.0)])[0].check(_request()))
    assert verdict.action is Action.DISCARD
    assert verdict.score == 12.0
    assert "tests=BAYES_99,URIBL_BLACK" in verdict.reason


def test_delete_action_quarantine_holds_the_message() -> None:
    spam_filter, _ = spamassassin([SYMBOLS_SPAM], delete_action="quarantine")
    delivered = deliver(spam_filter)
    assert delivered.reply.code == 250
    assert delivered.states() == ["hold"]


def test_delete_action_reject_refuses_at_end_of_data() -> None:
    spam_filter, _ = spamassassin([SYMBOLS_SPAM], delete_action="reject")
    delivered = deliver(spam_filter)
    assert delivered.reply == Reply(554, "5.7.1", "Message refused as spam (SpamAssassin score 1002.7)")
    assert delivered.spool.messages == {}


def test_custom_thresholds_prefix_and_header() -> None:
    spam_filter, _ = spamassassin(
        [symbols(5.5)], spam_score=5.0, delete_score=20.0, subject_prefix="[spam] ", header="X-Spam-Status"
    )
    stored = deliver(spam_filter).queued()
    assert b"Subject: [spam] offer\r\n" in stored
    assert b"X-Spam-Status: score=5.5 required=5 tests=" in stored


def test_a_message_larger_than_max_size_is_not_sent_and_passes() -> None:
    spam_filter, endpoint = spamassassin([], max_size=100)
    delivered = deliver(spam_filter, MESSAGE + b"x" * 200)
    assert delivered.reply.code == 250
    assert endpoint.attempts == []  # never connected
    assert b"SPAM***" not in delivered.queued()


@pytest.mark.parametrize(
    "script",
    [
        [ConnectionRefusedError(111, "Connection refused")],  # spamd down
        [b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n"],
        [SYMBOLS_SPAM[:40]],  # killed mid-answer
        [b"garbage\r\n\r\n"],
    ],
)
def test_spamd_broken_defers_the_message_never_passes_it(script: list[Any]) -> None:
    spam_filter, _ = spamassassin(script)
    delivered = deliver(spam_filter)
    assert delivered.reply.code == 451
    assert "spamassassin" in delivered.reply.text
    assert delivered.spool.messages == {}


def test_spamd_broken_with_on_failure_reject() -> None:
    spam_filter, _ = spamassassin([ConnectionRefusedError(111, "Connection refused")])
    assert deliver(spam_filter, on_failure="reject").reply.code == 554


def test_spamd_silent_times_out_and_defers() -> None:
    clock = Clock()
    spam_filter, endpoint = spamassassin([None], clock)
    spam_filter.client.connections.timeout = 20.0
    answer = spam_filter.check(_request())
    assert isinstance(answer, Deferred)
    assert not answer.called
    clock.advance(20)
    failures: list[Any] = []
    answer.addErrback(failures.append)
    assert failures and "no answer within 20 s" in str(failures[0].value)
    assert endpoint.last.dropped


def _request() -> Any:
    from gateway.content import MessageContent
    from gateway.filters import Request

    return Request(
        Stage.DATA,
        Direction.INBOUND,
        CLIENT,
        Envelope("a@partner.test", (Recipient("bob@example.com"),)),
        message=MessageContent.from_bytes(MESSAGE),
    )


# -- configuration ----------------------------------------------------------------------------


def build(options: str) -> SpamAssassin:
    cfg = config(f'[filters]\ninbound = ["spamassassin"]\n[filters.spamassassin]\n{options}')
    section = cfg.filters.section(cfg.source, "spamassassin")
    built = SpamAssassin.from_config(section, FilterServices(cfg, Clock()))
    section.done()
    return built


def test_defaults_are_the_seeds() -> None:
    spam_filter = build("")
    assert (spam_filter.spam_score, spam_filter.delete_score, spam_filter.delete_action) == (
        8.0,
        12.0,
        "discard",
    )
    assert spam_filter.subject_prefix == "SPAM*** "
    assert spam_filter.header == "X-Mailgate-SpamAssassin"
    assert spam_filter.max_size == 500 * 1024
    connections = spam_filter.client.connections
    assert connections.address == "tcp:127.0.0.1:783"
    assert (connections.max_connections, connections.connect_timeout, connections.timeout) == (5, 5.0, 20.0)
    assert spam_filter.client.user is None


def test_options_are_read() -> None:
    spam_filter = build(
        'server = "unix:/run/spamd.sock"\nmax_connections = 2\nconnect_timeout = "2s"\n'
        'scan_timeout = "1m"\nuser = "mailgate"\nspam_score = 6\ndelete_score = 9.5\n'
        'delete_action = "quarantine"\nmax_size = "1M"\n'
    )
    connections = spam_filter.client.connections
    assert (connections.address, connections.max_connections) == ("unix:/run/spamd.sock", 2)
    assert (connections.connect_timeout, connections.timeout) == (2.0, 60.0)
    assert spam_filter.client.user == "mailgate"
    assert (spam_filter.spam_score, spam_filter.delete_score) == (6.0, 9.5)
    assert spam_filter.delete_action == "quarantine"
    assert spam_filter.max_size == 1024 * 1024


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ('server = "nonsense"', "filters.spamassassin.server"),
        ("max_connections = 0", "filters.spamassassin.max_connections"),
        ("scan_timeout = 0", "filters.spamassassin.scan_timeout"),
        ("delete_score = 5", "filters.spamassassin.delete_score"),
        ('delete_action = "bounce"', "filters.spamassassin.delete_action"),
        ('user = "two words"', "filters.spamassassin.user"),
        ('header = "X Bad"', "filters.spamassassin.header"),
        ('subject_prefix = "a\\nb"', "filters.spamassassin.subject_prefix"),
        ('max_size = "huge"', "filters.spamassassin.max_size"),
        ("colour = 1", "filters.spamassassin.colour"),
    ],
)
def test_bad_options_name_the_key(options: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(options)
