"""RelayTransport's modes, with recording transports standing in for MX and the smart host."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from gateway.delivery.smtp import RelayTransport
from gateway.interfaces import ITransport
from gateway.model import Delivery, Envelope, Recipient, RecipientResult


@implementer(ITransport)
class RecordingTransport:
    def __init__(self, name: str, answer: Callable[[Recipient], int]) -> None:
        self.name = name
        self.answer = answer
        self.seen: list[list[str]] = []

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        self.seen.append([r.address for r in delivery.recipients])
        return succeed(
            [RecipientResult(r, self.answer(r), None, self.name, self.name) for r in delivery.recipients]
        )


def codes_by_local(recipient: Recipient) -> int:
    return int(recipient.address.split("@")[0][1:])  # "r250@x" -> 250


DELIVERY = Delivery(
    "Q1",
    Envelope("a@x", ()),
    (Recipient("r250@x"), Recipient("r451@x"), Recipient("r550@x")),
    "/nonexistent",
    10,
)


def run(mode: str) -> tuple[list[RecipientResult], RecordingTransport, RecordingTransport]:
    direct = RecordingTransport("mx", codes_by_local)
    upstream = RecordingTransport("relay", lambda r: 250)
    results: list[list[RecipientResult]] = []
    RelayTransport(direct, upstream, mode).deliver(DELIVERY).addCallback(results.append)
    return results[0], direct, upstream


def test_never() -> None:
    results, _direct, upstream = run("never")
    assert [r.code for r in results] == [250, 451, 550]
    assert upstream.seen == []


def test_always() -> None:
    results, direct, _upstream = run("always")
    assert [r.relay for r in results] == ["relay"] * 3
    assert direct.seen == []


def test_on_failure_relays_only_transient_failures() -> None:
    results, _direct, upstream = run("on-failure")
    assert upstream.seen == [["r451@x"]]
    assert [(r.code, r.relay) for r in results] == [(250, "mx"), (250, "relay"), (550, "mx")]


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="relay mode"):
        RelayTransport(
            RecordingTransport("a", codes_by_local), RecordingTransport("b", codes_by_local), "sometimes"
        )
