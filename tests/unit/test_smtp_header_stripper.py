"""Forged X-Mailgate-* header fields from Internet clients never reach the servers behind us."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from gateway.filters.testing import StaticFilter
from gateway.model import Action, Stage, Verdict
from gateway.smtp._data import HeaderStripper

from .test_smtp_server_filters import Gateway

FORGED = (
    b"From: spammer@example.net\r\n"
    b"X-Mailgate-Score: -100\r\n"
    b"Subject: cheap\r\n"
    b"x-mailgate-filters: dnsbl=accept\r\n"
    b"\tcontinued=accept\r\n"
    b"X-Mailgater: not ours\r\n"
    b"\r\n"
    b"X-Mailgate-Score: in the body stays\r\n"
)
CLEAN = (
    b"From: spammer@example.net\r\n"
    b"Subject: cheap\r\n"
    b"X-Mailgater: not ours\r\n"
    b"\r\n"
    b"X-Mailgate-Score: in the body stays\r\n"
)


def strip(chunks: list[bytes], limit: int = 8192) -> bytes:
    stripper = HeaderStripper(limit)
    return b"".join(stripper.feed(chunk) for chunk in chunks) + stripper.finish()


def test_our_fields_and_their_continuations_go_the_rest_stays() -> None:
    assert strip([FORGED]) == CLEAN


@given(st.lists(st.integers(min_value=0, max_value=len(FORGED)), max_size=12))
def test_any_split_into_chunks_gives_the_same_message(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [FORGED[a:b] for a, b in zip([0, *points], [*points, len(FORGED)], strict=True)]
    assert strip(chunks) == CLEAN


def test_a_message_that_is_all_header() -> None:
    assert strip([b"Subject: x\r\nX-Mailgate-Score: 1"]) == b"Subject: x\r\n"
    assert strip([b"Subject: x\r\nX-Mail"]) == b"Subject: x\r\nX-Mail"


def test_an_over_long_line_is_streamed_not_buffered() -> None:
    stripper = HeaderStripper(limit=16)
    long_value = b"Subject: " + b"a" * 100
    out = stripper.feed(long_value)
    assert out == long_value  # passed on at once: memory stays bounded
    out += stripper.feed(b"a\r\nX-Mailgate-Score: ")
    out += stripper.feed(b"b" * 100)  # a forged over-long one is dropped as it streams
    out += stripper.feed(b"\r\n\r\nbody\r\n") + stripper.finish()
    assert out == long_value + b"a\r\n\r\nbody\r\n"


def test_internet_mail_loses_forged_fields_and_keeps_ours() -> None:
    tagger = StaticFilter("dnsbl", {Stage.CONNECT: Verdict(Action.TAG, "listed", 2.0)})
    gateway = Gateway(tagger)
    dialogue = gateway.dialogue()
    dialogue.transaction()
    dialogue.send_message(FORGED)
    _, content = gateway.only_message()
    headers = content.split(b"\r\n\r\n", 1)[0]
    assert b"X-Mailgate-Filters: dnsbl=tag score=2" in headers  # ours, after Received
    assert b"-100" not in headers and b"continued=accept" not in headers
    assert content.endswith(b"X-Mailgate-Score: in the body stays\r\n")


def test_mail_from_internal_servers_is_left_alone() -> None:
    gateway = Gateway()
    dialogue = gateway.dialogue(relay_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    dialogue.transaction("a@example.com", "someone@elsewhere.test")
    dialogue.send_message(FORGED)
    _, content = gateway.only_message()
    assert b"X-Mailgate-Score: -100" in content
