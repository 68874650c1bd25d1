"""The spamd client against transcripts recorded from spamd 4.0.1 (SPAMC/1.5), on a Clock.

What the client sends is compared byte for byte with what spamc-style requests
look like; spamd's recorded answers are played back, whole or in pieces.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from gateway.scanners import ScannerError, ScannerProtocolError, ScannerTimeout, ScannerUnavailable
from gateway.scanners.spamd import SpamdClient, SpamdResult, TellResult, request
from gateway.scanners.testing import MemoryEndpoint

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAM = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: test\r\nMessage-ID: <1@example.com>\r\n\r\n"
    + GTUBE
    + b"\r\n"
)
HAM = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hello\r\nMessage-ID: <2@example.com>\r\n\r\nHi\r\n"
)

# recorded from spamd 4.0.1 (Debian), local tests only
SYMBOLS_SPAM = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 68\r\nSpam: True ; 1002.7 / 5.0\r\n\r\n"
    b"GTUBE,MISSING_DATE,MSGID_SHORT,NO_RECEIVED,NO_RELAYS,TVD_SPACE_RATIO"
)
SYMBOLS_HAM = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 46\r\nSpam: False ; 2.7 / 5.0\r\n\r\n"
    b"MISSING_DATE,MSGID_SHORT,NO_RECEIVED,NO_RELAYS"
)
CHECK_SPAM = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1002.7 / 5.0\r\n\r\n"
REPORT_SPAM = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 301\r\nSpam: True ; 1002.7 / 5.0\r\n\r\n"
    b"Content analysis details:   (1002.7 points, 5.0 required)\n\n"
    b" pts rule name              description\n"
    b"---- ---------------------- --------------------------------------------------\n"
    b" 2.7 MISSING_DATE           Missing Date: header\n"
    b"1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n"
)  # (the report's preamble is left out; the length is this body's)
TELL_SET = b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n\r\n"
TELL_REMOVED = b"SPAMD/1.1 0 EX_OK\r\nDidRemove: local\r\n\r\n\r\n"
TELL_ALREADY = b"SPAMD/1.1 0 EX_OK\r\n\r\n\r\n"  # learnt before: nothing set
PONG = b"SPAMD/1.5 0 PONG\r\n"
BAD_HEADER = b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: Expected 156 bytes, got 146 bytes)\r\n"


def client(endpoint: MemoryEndpoint, clock: Clock | None = None, **options: Any) -> SpamdClient:
    return SpamdClient(endpoint, clock or Clock(), address="tcp:127.0.0.1:783", **options)


def result(deferred: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def pending(deferred: Deferred[Any]) -> bool:
    return not deferred.called


def test_symbols_request_is_spamc_1_5_and_the_answer_gives_score_and_rules() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    assert endpoint.last.sent() == b"SYMBOLS SPAMC/1.5\r\nContent-length: 156\r\n\r\n" + SPAM
    endpoint.last.answer(SYMBOLS_SPAM)
    assert result(answer) == SpamdResult(
        spam=True,
        score=1002.7,
        threshold=5.0,
        symbols=("GTUBE", "MISSING_DATE", "MSGID_SHORT", "NO_RECEIVED", "NO_RELAYS", "TVD_SPACE_RATIO"),
    )


def test_ham_is_not_spam_and_keeps_its_score() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(HAM)
    endpoint.last.answer(SYMBOLS_HAM)
    found = result(answer)
    assert (found.spam, found.score, found.symbols[0]) == (False, 2.7, "MISSING_DATE")


def test_an_answer_arriving_byte_by_byte_is_read_once_complete() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    for byte in SYMBOLS_SPAM[:-1]:
        endpoint.last.answer(bytes([byte]), close=False)
        assert pending(answer)
    endpoint.last.answer(SYMBOLS_SPAM[-1:], close=False)  # complete by its Content-length
    assert result(answer).symbols[-1] == "TVD_SPACE_RATIO"
    assert endpoint.last.dropped  # and the client closes


def test_check_and_report() -> None:
    endpoint = MemoryEndpoint(auto=True)
    spamd = client(endpoint)
    checked = spamd.check(SPAM, "CHECK")
    assert endpoint.last.sent().startswith(b"CHECK SPAMC/1.5\r\n")
    endpoint.last.answer(CHECK_SPAM)
    assert result(checked) == SpamdResult(spam=True, score=1002.7, threshold=5.0)
    reported = spamd.report(SPAM)
    assert endpoint.last.sent().startswith(b"REPORT SPAMC/1.5\r\n")
    endpoint.last.answer(REPORT_SPAM)
    assert "1000 GTUBE" in result(reported).report
    with pytest.raises(ValueError, match="CHECK, SYMBOLS, REPORT"):
        spamd.check(SPAM, "PROCESS")


def test_user_header_is_sent_when_configured() -> None:
    endpoint = MemoryEndpoint(auto=True)
    client(endpoint, user="alice").symbols(HAM)
    assert endpoint.last.sent().startswith(b"SYMBOLS SPAMC/1.5\r\nContent-length: 91\r\nUser: alice\r\n\r\n")
    with pytest.raises(ValueError, match="one word"):
        client(endpoint, user="alice\r\nSet: local")


def test_tell_trains_spam_and_ham_and_forgets() -> None:
    endpoint = MemoryEndpoint(auto=True)
    spamd = client(endpoint)
    told = spamd.tell(SPAM, "spam")
    assert endpoint.last.sent() == (
        b"TELL SPAMC/1.5\r\nContent-length: 156\r\nMessage-class: spam\r\nSet: local\r\n\r\n" + SPAM
    )
    endpoint.last.answer(TELL_SET)
    assert result(told) == TellResult(did_set=("local",))
    again = spamd.tell(SPAM, "spam")
    endpoint.last.answer(TELL_ALREADY)
    assert result(again) == TellResult()
    forgot = spamd.tell(SPAM, "spam", remove=True)
    assert b"Message-class: spam\r\nRemove: local\r\n" in endpoint.last.sent()
    endpoint.last.answer(TELL_REMOVED)
    assert result(forgot) == TellResult(did_remove=("local",))
    ham = spamd.tell(HAM, "ham")
    assert b"Message-class: ham\r\n" in endpoint.last.sent()
    endpoint.last.answer(TELL_SET)
    assert result(ham).did_set == ("local",)
    with pytest.raises(ValueError):
        spamd.tell(HAM, "eggs")


def test_ping() -> None:
    endpoint = MemoryEndpoint(auto=True)
    pong = client(endpoint).ping()
    assert endpoint.last.sent() == b"PING SPAMC/1.5\r\n\r\n"
    endpoint.last.answer(PONG)
    assert result(pong) == "PONG"


def test_an_error_status_fails_with_spamds_words() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.answer(BAD_HEADER)
    with pytest.raises(
        ScannerProtocolError, match=re.escape("spamd refused the request: SPAMD/1.0 76 Bad header line")
    ):
        result(answer)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 3\r\n\r\nA,B",  # no Spam: header
        b"SPAMD/1.1 0 EX_OK\r\nSpam: Maybe ; x / 5\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: many\r\nSpam: True ; 9 / 5\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n",
    ],
)
def test_nonsense_is_an_error_never_a_clean_result(reply: bytes) -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.answer(reply)
    with pytest.raises(ScannerProtocolError):
        result(answer)


def test_an_answer_cut_short_is_an_error() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.answer(SYMBOLS_SPAM[:-5])  # spamd died before the end of its body
    with pytest.raises(ScannerUnavailable, match="before its answer was complete"):
        result(answer)


def test_a_daemon_that_talks_without_end_is_cut_off() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.answer(
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 99999999\r\nSpam: True ; 9 / 5\r\n\r\n", close=False
    )
    for _ in range(20):
        endpoint.last.answer(b"A" * 65536, close=False)
        if answer.called:
            break
    with pytest.raises(ScannerProtocolError, match="more than 1048576 bytes"):
        result(answer)
    assert endpoint.last.dropped


def test_refused_connection_is_unavailable() -> None:
    endpoint = MemoryEndpoint()
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.refuse()
    with pytest.raises(ScannerUnavailable, match=re.escape("cannot connect to spamd at tcp:127.0.0.1:783")):
        result(answer)


def test_connect_timeout() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint()
    answer = client(endpoint, clock, connect_timeout=5.0, timeout=30.0).symbols(SPAM)
    clock.advance(4.9)
    assert pending(answer)
    clock.advance(0.1)
    with pytest.raises(ScannerTimeout, match="no connection within 5 s"):
        result(answer)
    assert endpoint.last.cancelled  # the attempt is given up, not left to finish


def test_overall_timeout_drops_the_connection_and_frees_its_turn() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(auto=True)
    spamd = client(endpoint, clock, max_connections=1, timeout=20.0)
    answer = spamd.symbols(SPAM)
    clock.advance(20)
    with pytest.raises(ScannerTimeout, match=re.escape("spamd at tcp:127.0.0.1:783: no answer within 20 s")):
        result(answer)
    assert endpoint.last.dropped
    assert spamd.connections.busy == 0
    later = spamd.symbols(HAM)  # the one connection is free again
    endpoint.last.answer(SYMBOLS_HAM)
    assert result(later).score == 2.7


def test_connection_limit_queues_the_others_in_order() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(auto=True)
    spamd = client(endpoint, clock, max_connections=2, timeout=10.0)
    first, second = spamd.symbols(SPAM), spamd.symbols(HAM)
    clock.advance(1)
    third, fourth = spamd.symbols(HAM), spamd.symbols(SPAM)  # wait: both connections are busy
    assert len(endpoint.attempts) == 2
    assert (spamd.connections.busy, spamd.connections.waiting) == (2, 2)
    endpoint.attempts[0].answer(SYMBOLS_SPAM)
    assert result(first).spam
    assert len(endpoint.attempts) == 3  # the third's turn came
    assert endpoint.attempts[2].sent().endswith(HAM)
    endpoint.attempts[2].answer(SYMBOLS_HAM)
    assert not result(third).spam
    assert endpoint.attempts[3].sent().endswith(SPAM)
    clock.advance(9)  # the second's time is up; the fourth, waiting since 1, has 1 s left
    with pytest.raises(ScannerTimeout):
        result(second)
    clock.advance(1)
    with pytest.raises(ScannerTimeout, match="no answer within 10 s"):
        result(fourth)
    assert (spamd.connections.busy, spamd.connections.waiting) == (0, 0)
    assert all(attempt.dropped for attempt in endpoint.attempts)


def test_cancelling_drops_the_connection_and_frees_its_turn() -> None:
    """The chain runner cancels a check that outlives the filter's timeout."""
    endpoint = MemoryEndpoint(auto=True)
    spamd = client(endpoint, max_connections=1)
    answer = spamd.symbols(SPAM)
    waiting = spamd.symbols(HAM)
    answer.cancel()
    with pytest.raises(CancelledError):
        result(answer)
    assert endpoint.attempts[0].dropped
    endpoint.last.answer(SYMBOLS_HAM)  # the waiting one got the connection
    assert result(waiting).score == 2.7
    waiting_again = spamd.symbols(HAM)
    also = spamd.symbols(HAM)
    also.cancel()  # cancelled while waiting for a turn: leaves the queue
    with pytest.raises(CancelledError):
        result(also)
    assert spamd.connections.waiting == 0
    assert len(endpoint.attempts) == 3  # it never connected
    endpoint.last.answer(SYMBOLS_HAM)
    assert result(waiting_again).score == 2.7
    assert spamd.connections.busy == 0


def test_killed_mid_answer_fails() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.answer(SYMBOLS_SPAM[:30], close=False)
    endpoint.last.close(clean=False)
    with pytest.raises(ScannerUnavailable):
        result(answer)


def test_request_bytes() -> None:
    assert request("CHECK", b"x", "bob", [("Compress", "no")]) == (
        b"CHECK SPAMC/1.5\r\nContent-length: 1\r\nUser: bob\r\nCompress: no\r\n\r\nx"
    )


@given(cuts=st.lists(st.integers(0, len(SYMBOLS_SPAM)), max_size=6))
def test_any_split_of_an_answer_reads_the_same(cuts: list[int]) -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    edges = [0, *sorted(cuts), len(SYMBOLS_SPAM)]
    for start, end in itertools.pairwise(edges):
        endpoint.last.answer(SYMBOLS_SPAM[start:end], close=False)
    endpoint.last.close()
    assert result(answer).symbols[0] == "GTUBE"


@given(reply=st.binary(max_size=300))
def test_whatever_a_broken_daemon_says_is_never_a_result_unless_it_is_one(reply: bytes) -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).symbols(SPAM)
    endpoint.last.answer(reply)
    outcome: list[Any] = []
    answer.addBoth(outcome.append)
    if isinstance(outcome[0], SpamdResult):
        assert reply.startswith(b"SPAMD/") and b" 0 " in reply.split(b"\r\n")[0]
        assert b"\r\nSpam: " in reply or b"\r\nspam: " in reply.lower()
    else:
        assert outcome[0].check(ScannerError)
