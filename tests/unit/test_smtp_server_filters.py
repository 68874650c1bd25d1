"""The filter chain as a client sees it: verdicts at each stage become replies and queue actions.

A real `Reception` over a `MemorySpool`, with `StaticFilter`s in the chain, driven by
the `Dialogue` of test_smtp_server.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from zope.interface import implementer

from gateway.config import RelayConfig
from gateway.filters.chain import ChainRunner, Link
from gateway.filters.testing import StaticFilter
from gateway.interfaces import IAcceptObserver, IAuthGuard, ISessionObserver
from gateway.model import ACCEPT, CONTINUE, Action, Direction, Stage, Verdict
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception

from .test_smtp_auth import b64, credentials
from .test_smtp_server import SETTINGS, Dialogue

RELAY = RelayConfig(domains=("example.com",))


class Gateway:
    """A reception with one inbound chain, and dialogues against it."""

    def __init__(self, *filters: Any, headers: bool = True, outbound: tuple[Any, ...] = ()) -> None:
        self.spool = MemorySpool()
        self.runner = ChainRunner(
            {
                Direction.INBOUND: tuple(Link(f) for f in filters),
                Direction.OUTBOUND: tuple(Link(f) for f in outbound),
            },
            clock=Clock(),
        )
        self.reception = Reception(self.spool, RELAY, self.runner, headers=headers)

    def dialogue(self, **kwargs: Any) -> Dialogue:
        return Dialogue(reception=self.reception, **kwargs)  # type: ignore[arg-type]

    def only_message(self) -> Any:
        assert len(self.spool.messages) == 1, self.spool.messages
        (message,) = self.spool.messages.values()
        return message, self.spool.contents[message.queue_id]


def test_a_connect_reject_replaces_the_banner_and_ends_the_session() -> None:
    gateway = Gateway(StaticFilter("lists", {Stage.CONNECT: Verdict.reject("Access denied: client blocked")}))
    dialogue = gateway.dialogue()
    assert dialogue.greeting == ["554 5.7.1 Access denied: client blocked"]
    assert dialogue.closed


def test_a_connect_defer_is_421() -> None:
    gateway = Gateway(StaticFilter("limits", {Stage.CONNECT: Verdict.defer("Too many connections")}))
    dialogue = gateway.dialogue()
    assert dialogue.greeting == ["421 4.7.1 Too many connections"]
    assert dialogue.closed


def test_no_banner_before_the_connect_stage_is_over_and_an_early_talker_is_marked() -> None:
    slow = StaticFilter("protocol", {Stage.CONNECT: "wait"})
    watcher = StaticFilter("watcher", {Stage.HELO: CONTINUE})
    dialogue = Gateway(slow, watcher).dialogue()
    assert dialogue.greeting == []
    dialogue.send(b"EHLO spam.example\r\n")  # talks before the banner
    assert dialogue.take() == []  # nothing is answered before the banner
    slow.waiting[0].callback(CONTINUE)
    lines = dialogue.take()
    assert lines[0] == "220 mx.test ESMTP MailGate"
    assert lines[1].startswith("250-mx.test")
    assert watcher.requests[0].session.pregreet


def test_a_polite_client_is_not_an_early_talker() -> None:
    watcher = StaticFilter("watcher", {Stage.HELO: CONTINUE})
    dialogue = Gateway(watcher).dialogue()
    dialogue.ehlo()
    assert not watcher.requests[0].session.pregreet


def test_a_refused_helo_leaves_the_client_unintroduced() -> None:
    helo = StaticFilter(
        "helo",
        {Stage.HELO: Verdict.reject("Helo command rejected: need fully-qualified hostname", 504, "5.5.2")},
    )
    dialogue = Gateway(helo).dialogue()
    assert dialogue.ask("HELO localhost") == [
        "504 5.5.2 Helo command rejected: need fully-qualified hostname"
    ]
    assert dialogue.ask("MAIL FROM:<a@example.org>") == ["503 5.5.1 Error: send HELO/EHLO first"]


def test_commands_pipelined_without_pipelining_are_marked() -> None:
    watcher = StaticFilter("protocol", {Stage.MAIL: CONTINUE})
    dialogue = Gateway(watcher).dialogue()
    dialogue.send(b"HELO client.example\r\nMAIL FROM:<a@example.org>\r\n")
    assert watcher.requests[0].session.improper_pipelining
    polite = StaticFilter("protocol", {Stage.MAIL: CONTINUE})
    dialogue = Gateway(polite).dialogue()
    dialogue.ehlo()  # PIPELINING offered: sending ahead is fine now
    dialogue.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    assert not polite.requests[0].session.improper_pipelining


def test_per_recipient_verdicts_refuse_one_recipient_and_deliver_the_other() -> None:
    def by_recipient(request: Any) -> Verdict:
        if request.recipient.address == "gone@example.com":
            return Verdict.reject(
                "<gone@example.com>: Recipient address rejected: User unknown", 550, "5.1.1"
            )
        return CONTINUE

    gateway = Gateway(StaticFilter("recipients", {Stage.RCPT: by_recipient}))
    dialogue = gateway.dialogue()
    dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org>")
    assert dialogue.ask("RCPT TO:<gone@example.com>") == [
        "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"
    ]
    assert dialogue.ask("RCPT TO:<bob@example.com>")[0].startswith("250")
    assert dialogue.send_message()[0].startswith("250 2.0.0 Ok: queued as")
    message, _ = gateway.only_message()
    assert [r.recipient.address for r in message.recipients] == ["bob@example.com"]


def test_redirect_discard_and_copy_act_per_recipient_and_lose_nobody() -> None:
    def verdicts(request: Any) -> Verdict:
        address = request.recipient.address
        if address == "unknown@example.com":
            return Verdict(Action.REDIRECT, "unknown user", target="catchall@example.com")
        if address == "spamtrap@example.com":
            return Verdict(Action.DISCARD, "spam trap")
        if address == "watched@example.com":
            return Verdict(Action.COPY_TO, "monitored", target="auditor@example.com")
        return CONTINUE

    gateway = Gateway(StaticFilter("policy", {Stage.RCPT: verdicts}))
    dialogue = gateway.dialogue()
    dialogue.transaction(
        "a@example.org",
        "unknown@example.com",
        "spamtrap@example.com",
        "watched@example.com",
        "bob@example.com",
    )
    assert dialogue.send_message()[0].startswith("250")
    message, _ = gateway.only_message()
    recipients = [(r.recipient.address, r.recipient.orcpt) for r in message.recipients]
    assert recipients == [
        ("catchall@example.com", "rfc822;unknown@example.com"),
        ("watched@example.com", None),
        ("bob@example.com", None),
        ("auditor@example.com", None),
    ]


def test_a_message_every_recipient_of_which_is_discarded_is_250_and_not_queued() -> None:
    gateway = Gateway(StaticFilter("policy", {Stage.RCPT: Verdict(Action.DISCARD, "trap")}))
    dialogue = gateway.dialogue()
    dialogue.transaction("a@example.org", "trap@example.com")
    assert dialogue.send_message()[0].startswith("250 2.0.0 Ok")
    assert gateway.spool.messages == {}


def test_quarantine_puts_the_message_on_hold() -> None:
    gateway = Gateway(StaticFilter("quota", {Stage.MAIL: Verdict(Action.QUARANTINE, "send quota exceeded")}))
    dialogue = gateway.dialogue()
    dialogue.transaction("a@example.org", "bob@example.com", "carol@example.com")
    assert dialogue.send_message()[0].startswith("250")
    message, _ = gateway.only_message()
    assert message.state == "hold"
    assert len(message.recipients) == 2  # held whole: nobody lost


def test_tags_and_hits_are_recorded_in_headers_after_received() -> None:
    tagger = StaticFilter(
        "dnsbl", {Stage.CONNECT: Verdict(Action.TAG, "listed", 3.0, (("X-Mailgate-Dnsbl", "zen.example"),))}
    )
    gateway = Gateway(tagger)
    dialogue = gateway.dialogue()
    dialogue.transaction()
    dialogue.send_message()
    _, content = gateway.only_message()
    lines = content.split(b"\r\n")
    assert lines[0].startswith(b"Received: ")
    headers = [line for line in lines if line.startswith(b"X-Mailgate")]
    assert headers[0] == b"X-Mailgate-Dnsbl: zen.example"
    assert headers[1].startswith(b"X-Mailgate-Filters: dnsbl=tag score=3 (")
    assert headers[2] == b"X-Mailgate-Score: 3"
    assert content.endswith(b"Subject: hi\r\n\r\nhello\r\n")


def test_no_mailgate_headers_when_nothing_hit_or_when_switched_off() -> None:
    gateway = Gateway(StaticFilter("quiet"))
    dialogue = gateway.dialogue()
    dialogue.transaction()
    dialogue.send_message()
    assert b"X-Mailgate" not in gateway.only_message()[1]
    gateway = Gateway(StaticFilter("t", {Stage.MAIL: Verdict(Action.TAG, "x", 1.0)}), headers=False)
    dialogue = gateway.dialogue()
    dialogue.transaction()
    dialogue.send_message()
    assert b"X-Mailgate" not in gateway.only_message()[1]


def test_a_data_stage_reject_is_sent_after_the_data_and_nothing_is_queued() -> None:
    gateway = Gateway(
        StaticFilter("content", {Stage.DATA: Verdict.reject("Message content rejected", 554, "5.7.1")})
    )
    dialogue = gateway.dialogue()
    dialogue.transaction()
    assert dialogue.send_message() == ["554 5.7.1 Message content rejected"]
    assert gateway.spool.messages == {}


def test_a_data_stage_accept_queues_normally() -> None:
    gateway = Gateway(
        StaticFilter("awl", {Stage.DATA: ACCEPT}), StaticFilter("content", {Stage.DATA: Verdict.reject("x")})
    )
    dialogue = gateway.dialogue()
    dialogue.transaction()
    assert dialogue.send_message()[0].startswith("250")


def test_relay_control_comes_before_the_chain() -> None:
    everything = StaticFilter("open", {Stage.RCPT: ACCEPT})
    dialogue = Gateway(everything).dialogue()
    dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org>")
    assert dialogue.ask("RCPT TO:<victim@elsewhere.test>") == [
        "554 5.7.1 <victim@elsewhere.test>: Relay access denied"
    ]
    assert everything.requests == []


def test_relay_clients_run_the_outbound_chain() -> None:
    inbound = StaticFilter("inbound-only", {Stage.MAIL: Verdict.reject("inbound")})
    outbound = StaticFilter("outbound-only", {Stage.MAIL: CONTINUE})
    import ipaddress

    gateway = Gateway(inbound, outbound=(outbound,))
    dialogue = gateway.dialogue(relay_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    dialogue.ehlo()
    assert dialogue.ask("MAIL FROM:<a@example.com>")[0].startswith("250")
    assert outbound.requests[0].direction is Direction.OUTBOUND
    assert inbound.requests == []


@implementer(ISessionObserver, IAcceptObserver)
class Observer(StaticFilter):
    def __init__(self) -> None:
        super().__init__("observer", {Stage.CONNECT: CONTINUE, Stage.DATA: CONTINUE})
        self.closed: list[dict[str, int]] = []
        self.accepted: list[tuple[Any, Any, bool]] = []

    def session_closed(self, session: Any, counts: dict[str, int]) -> None:
        self.closed.append(counts)

    def message_accepted(self, request: Any, hits: Any, held: bool) -> None:
        self.accepted.append((request, hits, held))


def test_observers_hear_of_queued_messages_and_the_end_of_the_session() -> None:
    observer = Observer()
    dialogue = Gateway(observer).dialogue()
    dialogue.transaction()
    dialogue.send_message()
    assert len(observer.accepted) == 1 and observer.accepted[0][2] is False
    dialogue.ask("RSET")
    dialogue.protocol.connectionLost(None)  # type: ignore[arg-type]
    assert observer.closed == [
        {"commands": 5, "errors": 0, "messages": 1, "recipients": 1, "rset": 1, "unknown_recipients": 0}
    ]


def test_the_tarpit_slows_error_replies_after_the_soft_limit() -> None:
    settings = attrs.evolve(SETTINGS, soft_error_limit=2, error_delay=1.5)
    dialogue = Gateway().dialogue(settings=settings)
    assert dialogue.ask("BOGUS")[0].startswith("500")
    assert dialogue.ask("BOGUS")[0].startswith("500")
    assert dialogue.ask("BOGUS") == []  # the third error waits
    dialogue.send(b"NOOP\r\n")  # and so does everything after it
    assert dialogue.take() == []
    dialogue.clock.advance(1.5)
    assert dialogue.take() == ["500 5.5.2 Error: command not recognized", "250 2.0.0 Ok"]


@implementer(IAuthGuard)
class LockOut(StaticFilter):
    def __init__(self) -> None:
        super().__init__("limits", {})
        self.results: list[tuple[str, bool]] = []
        self.locked = False

    def auth_allowed(self, session: Any) -> Verdict:
        return (
            Verdict.defer("too many AUTH failures from your address", 454, "4.7.0")
            if self.locked
            else CONTINUE
        )

    def auth_result(self, session: Any, user: str, success: bool) -> float:
        self.results.append((user, success))
        return 0.0


def test_auth_guards_hear_results_and_can_lock_a_client_out() -> None:
    guard = LockOut()
    gateway = Gateway(guard)
    dialogue = gateway.dialogue(
        tls_context=object(),
        credentials=credentials(),
        settings=attrs.evolve(SETTINGS, auth_requires_tls=False),
    )
    dialogue.ehlo()
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0wrong"))[0].startswith("535")
    guard.locked = True
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret")) == [
        "454 4.7.0 too many AUTH failures from your address"
    ]
    guard.locked = False
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret"))[0].startswith("235")
    assert guard.results == [("alice", False), ("alice", True)]


def test_end_of_data_tags_are_added_to_the_message_with_the_total_score() -> None:
    early = StaticFilter("dnsbl", {Stage.CONNECT: Verdict(Action.TAG, "listed", 2.0)})
    content_filter = StaticFilter(
        "bayes", {Stage.DATA: Verdict(Action.TAG, "spammy", 5.5, (("X-Spam-Flag", "YES"),))}
    )
    gateway = Gateway(early, content_filter)
    dialogue = gateway.dialogue()
    dialogue.transaction()
    assert dialogue.send_message()[0].startswith("250")
    _, content = gateway.only_message()
    assert content.startswith(b"Received: ")
    fields = [line for line in content.split(b"\r\n\r\n", 1)[0].split(b"\r\n") if line[:1] != b"\t"]
    assert fields[1].startswith(b"X-Mailgate-Filters: dnsbl=tag score=2 (")  # written before the body
    assert fields[2] == b"X-Spam-Flag: YES"  # added at the end of data, after the first ones
    assert fields[3].startswith(b"X-Mailgate-Filters: bayes=tag score=5.5 (")
    assert fields[4] == b"X-Mailgate-Score: 7.5"
    assert fields[5] == b"Subject: hi"


def test_a_refused_recipient_leaves_no_copy_and_no_tag_behind() -> None:
    audit = StaticFilter(
        "audit",
        {Stage.RCPT: Verdict(Action.COPY_TO, "watched", 1.0, (("X-Watched", "yes"),), "auditor@example.com")},
    )

    def unknown(request: Any) -> Verdict:
        if request.recipient.address == "gone@example.com":
            return Verdict.reject("User unknown", 550, "5.1.1")
        return CONTINUE

    gateway = Gateway(audit, StaticFilter("recipients", {Stage.RCPT: unknown}))
    dialogue = gateway.dialogue()
    dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org>")
    assert dialogue.ask("RCPT TO:<gone@example.com>")[0].startswith("550 5.1.1")
    assert dialogue.ask("RCPT TO:<bob@example.com>")[0].startswith("250")
    dialogue.send_message()
    message, content = gateway.only_message()
    # bob's own copy to the auditor stands; gone@'s refused RCPT added nothing
    assert [r.recipient.address for r in message.recipients] == ["bob@example.com", "auditor@example.com"]
    assert content.count(b"audit=copy-to") == 1


def test_a_second_ehlo_replaces_what_the_first_one_was_told() -> None:
    tagger = StaticFilter("helo", {Stage.HELO: Verdict(Action.TAG, "odd name", 1.0)})
    gateway = Gateway(tagger)
    dialogue = gateway.dialogue()
    dialogue.ehlo()
    dialogue.transaction()  # EHLO again, then the transaction
    dialogue.send_message()
    _, content = gateway.only_message()
    assert content.count(b"helo=tag") == 1
    assert b"X-Mailgate-Score: 1\r\n" in content
