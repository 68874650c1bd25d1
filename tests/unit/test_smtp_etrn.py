"""ETRN (RFC 1985): internal servers ask for a domain's mail now; nobody else may."""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from gateway.config import DeliveryConfig
from gateway.delivery.manager import QueueManager
from gateway.delivery.router import Router
from gateway.model import Envelope, Recipient, RecipientResult, Role, Session
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.smtp.server import ServerSettings
from tests.unit.reception_driver import config, fired
from tests.unit.test_smtp_server import Dialogue

INTERNAL = (ipaddress.ip_network("10.0.0.0/8"),)


def internal() -> Dialogue:
    return Dialogue(ServerSettings(), relay_networks=INTERNAL, peer="10.1.2.3")


def test_an_internal_server_sees_etrn_offered_and_may_use_it() -> None:
    dialogue = internal()
    assert any(line[4:] == "ETRN" for line in dialogue.ehlo())
    assert dialogue.ask("ETRN example.com") == ["250 2.0.0 Queuing started"]
    assert dialogue.ask("ETRN @Sub.Example.COM") == ["250 2.0.0 Queuing started"]
    assert ("etrn", "example.com") in dialogue.reception.calls
    assert ("etrn", "sub.example.com") in dialogue.reception.calls


def test_the_internet_is_not_offered_etrn_and_is_refused() -> None:
    dialogue = Dialogue(ServerSettings(), peer="192.0.2.1")
    assert not any("ETRN" in line for line in dialogue.ehlo())
    assert dialogue.ask("ETRN example.com") == [
        "459 4.7.1 <example.com>: ETRN is for the internal servers only"
    ]
    assert not any(call[0] == "etrn" for call in dialogue.reception.calls)


def test_a_submission_listener_may_etrn_and_bad_syntax_or_a_transaction_is_refused() -> None:
    dialogue = Dialogue(ServerSettings(), role=Role.SUBMISSION)
    dialogue.ehlo()
    assert dialogue.ask("ETRN") == ["501 5.5.4 Syntax: ETRN domain"]
    assert dialogue.ask("ETRN exa mple.com") == ["501 5.5.4 Syntax: ETRN domain"]
    assert dialogue.ask("MAIL FROM:<a@example.org>")[0].startswith("250")
    assert dialogue.ask("ETRN example.com") == ["503 5.5.1 Error: MAIL transaction in progress"]


def test_etrn_can_be_switched_off() -> None:
    dialogue = Dialogue(ServerSettings(etrn_enabled=False), relay_networks=INTERNAL, peer="10.1.2.3")
    assert not any("ETRN" in line for line in dialogue.ehlo())
    assert dialogue.ask("ETRN example.com") == ["502 5.5.1 ETRN command is disabled"]


def test_the_reception_passes_etrn_on_or_says_it_cannot() -> None:
    reception = Reception(MemorySpool(), config("").relay)
    checks = reception.open_session(Session("10.1.2.3", may_relay=True))
    assert checks.etrn(Session("10.1.2.3"), "example.com").code == 458
    asked: list[str] = []
    reception.etrn = asked.append
    assert checks.etrn(Session("10.1.2.3"), "example.com").code == 250
    assert asked == ["example.com"]


def test_flush_domain_wakes_the_deferred_mail_of_that_domain_and_its_subdomains() -> None:
    spool = MemorySpool()
    delivered: list[str] = []

    class Deferring:
        name = "test"

        def deliver(self, delivery):  # type: ignore[no-untyped-def]
            delivered.append(delivery.queue_id)
            return succeed([RecipientResult(r, 451, "4.4.1", "later", "none") for r in delivery.recipients])

    clock = Clock()
    manager = QueueManager(
        spool, Router(()), lambda route: Deferring(), lambda m, f: succeed(None), DeliveryConfig(), clock
    )
    spool.subscribe(manager.wake)
    ids = {}
    for to in ("a@example.com", "b@mail.example.com", "c@other.test"):
        message = spool.new_message()
        message.write(b"Subject: x\r\n\r\nx\r\n")
        ids[to] = fired(message.commit(Envelope("s@x.test", (Recipient(to),)), Session("10.1.2.3")))
    clock.advance(1)
    assert sorted(spool.list("deferred")) == sorted(ids.values())
    delivered.clear()
    assert manager.flush_domain("Example.com") == 2
    clock.advance(1)
    assert sorted(delivered) == sorted([ids["a@example.com"], ids["b@mail.example.com"]])
