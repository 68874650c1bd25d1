"""The end-of-data stage: filters read the message, tag its Subject, quarantine it with a record."""

from __future__ import annotations

from gateway.filters import Request
from gateway.filters.testing import StaticFilter
from gateway.model import Action, Direction, Envelope, Quarantine, Recipient, Session, Stage, Verdict
from gateway.reception import Reception
from gateway.smtp.reply import Reply
from tests.unit.reception_driver import Driver, fired

CLIENT = Session("192.0.2.10")


def driver(*filters: StaticFilter) -> Driver:
    return Driver("[filters]\ninbound = []\n", appended={Direction.INBOUND: filters})


def test_a_data_stage_filter_reads_the_raw_message_and_its_parse() -> None:
    seen: list[tuple[bytes, str]] = []

    def look(request: Request) -> Verdict:
        assert request.message is not None
        parsed = fired(request.message.parsed())
        seen.append((request.message.read(), parsed.subject))
        return Verdict(Action.CONTINUE)

    gateway = driver(StaticFilter("reader", {Stage.DATA: look}))
    gateway.send(CLIENT, "alice@partner.test")
    assert seen == [(b"Subject: test\r\n\r\nhello\r\n", "test")]


def test_a_tag_with_a_subject_prefix_marks_the_queued_message() -> None:
    spam = Verdict(
        Action.TAG, "bayes 9.1", score=9.1, headers=(("X-Bayes", "9.1"),), subject_prefix="SPAM*** "
    )
    gateway = driver(StaticFilter("bayes", {Stage.DATA: spam}), StaticFilter("again", {Stage.DATA: spam}))
    _mail, _rcpts, end = gateway.send(CLIENT, "alice@partner.test")
    assert end is not None and end.code == 250
    [content] = gateway.spool.contents.values()
    assert b"Subject: SPAM*** test\r\n" in content
    assert content.count(b"SPAM***") == 1
    assert b"X-Bayes: 9.1\r\n" in content
    assert b"X-Mailgate-Score: 18.2\r\n" in content


def test_a_quarantined_message_is_held_with_the_filters_that_spoke() -> None:
    gateway = driver(
        StaticFilter("dnsbl", {Stage.RCPT: Verdict(Action.TAG, "listed", score=2)}),
        StaticFilter("clamav", {Stage.DATA: Verdict(Action.QUARANTINE, "virus Eicar-Signature")}),
    )
    _mail, _rcpts, end = gateway.send(CLIENT, "alice@partner.test")
    assert end is not None and end.code == 250
    [message] = gateway.spool.messages.values()
    assert message.state == "hold"
    assert message.quarantine == Quarantine(
        "virus Eicar-Signature",
        "inbound",
        (("dnsbl", "tag", "listed", 2.0), ("clamav", "quarantine", "virus Eicar-Signature", 0.0)),
    )


def _send_rejected(keep: bool) -> tuple[Reply, Reception]:
    gateway = driver(StaticFilter("rules", {Stage.DATA: Verdict.reject("forbidden attachment")}))
    reception = Reception(gateway.spool, gateway.config.relay, gateway.runner, keep_rejected=keep)
    checks = reception.open_session(CLIENT)
    envelope = Envelope("alice@partner.test", (Recipient("bob@example.com"),))
    message = checks.new_message(CLIENT)
    message.write(b"Subject: invoice\r\n\r\nsee attached\r\n")
    return fired(checks.accept(CLIENT, envelope, message)), reception


def test_a_rejected_message_is_kept_for_review_only_when_configured() -> None:
    reply, reception = _send_rejected(keep=False)
    assert reply == Reply(554, "5.7.1", "forbidden attachment")
    assert reception.spool.messages == {}  # type: ignore[attr-defined]
    reply, reception = _send_rejected(keep=True)
    assert reply == Reply(554, "5.7.1", "forbidden attachment")  # the client is refused all the same
    [message] = reception.spool.messages.values()  # type: ignore[attr-defined]
    assert message.state == "hold"
    assert message.quarantine is not None
    assert (message.quarantine.kind, message.quarantine.reason) == ("rejected", "forbidden attachment")


def test_headers_on_a_copy_or_a_quarantine_are_kept_on_the_message() -> None:
    gateway = driver(
        StaticFilter(
            "rules",
            {
                Stage.DATA: Verdict(
                    Action.COPY_TO, "audit", target="audit@example.com", headers=(("X-Rule", "audit"),)
                )
            },
        ),
        StaticFilter(
            "bayes", {Stage.DATA: Verdict(Action.QUARANTINE, "bayes 8", score=8, headers=(("X-Bayes", "8"),))}
        ),
    )
    gateway.send(CLIENT, "alice@partner.test")
    [message] = gateway.spool.messages.values()
    [content] = gateway.spool.contents.values()
    assert message.state == "hold"
    assert [r.recipient.address for r in message.recipients] == ["bob@example.com", "audit@example.com"]
    assert b"X-Rule: audit\r\n" in content and b"X-Bayes: 8\r\n" in content


FETCHED = Session("192.0.2.99", fetched_from="pop3 sales@pop.example.net", may_relay=True)


def fetched_driver(policy: str) -> tuple[Driver, Reception]:
    gateway = Driver(
        "[filters]\ninbound = []\n",
        appended={
            Direction.FETCHED: (StaticFilter("rules", {Stage.DATA: Verdict.reject("forbidden word")}),)
        },
    )
    reception = Reception(gateway.spool, gateway.config.relay, gateway.runner, fetched_refusal=policy)
    return gateway, reception


def fetch_one(reception: Reception) -> Reply:
    checks = reception.open_session(FETCHED)
    envelope = Envelope("alice@partner.test", (Recipient("sales@corp.example"),))
    assert fired(checks.mail(FETCHED, envelope)) is None
    assert fired(checks.rcpt(FETCHED, envelope, envelope.rcpt_to[0])) is None
    message = checks.new_message(FETCHED)
    message.write(b"Subject: offer\r\n\r\nbody\r\n")
    return fired(checks.accept(FETCHED, envelope, message))


def test_fetched_mail_runs_the_fetched_chain_and_a_refusal_becomes_quarantine_by_default() -> None:
    gateway, reception = fetched_driver("quarantine")
    assert fetch_one(reception).code == 250  # nobody to refuse: the poller is told it is done
    [message] = gateway.spool.messages.values()
    assert message.state == "hold"
    assert message.quarantine is not None and message.quarantine.reason == "refused: forbidden word"
    assert message.quarantine.direction == "fetched"


def test_a_refusal_of_fetched_mail_can_tag_or_delete_it() -> None:
    gateway, reception = fetched_driver("tag")
    assert fetch_one(reception).code == 250
    [message] = gateway.spool.messages.values()
    assert message.state == "incoming"
    assert b"X-Mailgate-Refused: forbidden word\r\n" in next(iter(gateway.spool.contents.values()))
    gateway, reception = fetched_driver("delete")
    assert fetch_one(reception).code == 250
    assert gateway.spool.messages == {}


def test_a_malformed_message_the_filters_read_is_logged_once_with_its_defects() -> None:
    from twisted.logger import capturedLogs

    def read(request: Request) -> Verdict:
        assert request.message is not None
        fired(request.message.parsed())
        return Verdict(Action.CONTINUE)

    gateway = driver(StaticFilter("reader", {Stage.DATA: read}))
    reception = Reception(gateway.spool, gateway.config.relay, gateway.runner)
    checks = reception.open_session(CLIENT)
    envelope = Envelope("alice@partner.test", (Recipient("bob@example.com"),))
    message = checks.new_message(CLIENT)
    message.write(
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nSGVsbG8g!!!*\r\n"
    )
    with capturedLogs() as events:
        assert fired(checks.accept(CLIENT, envelope, message)).code == 250
    lines = [e["log_format"] for e in events if "malformed" in e.get("log_format", "")]
    assert len(lines) == 1
