"""The clamd client against answers recorded from clamd 1.4.6, on a Clock.

The stream is checked as clamd reads it: a command ended by NUL (z) or newline
(n), then 4-byte big-endian chunk lengths, then a zero length.
"""

from __future__ import annotations

import io
import re
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from gateway.scanners import ScannerProtocolError, ScannerTimeout, ScannerTooLarge, ScannerUnavailable
from gateway.scanners.clamd import ClamdClient, ClamdResult
from gateway.scanners.testing import MemoryEndpoint

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

# recorded from clamd 1.4.6 (Debian) with a test database made by sigtool
FOUND = b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0"
CLEAN = b"stream: OK\0"
TOO_LARGE = b"INSTREAM size limit exceeded. ERROR\0"
UNKNOWN = b"UNKNOWN COMMAND\0"


def client(endpoint: MemoryEndpoint, clock: Clock | None = None, **options: Any) -> ClamdClient:
    return ClamdClient(endpoint, clock or Clock(), address="unix:/run/clamav/clamd.ctl", **options)


def result(deferred: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def unstream(sent: bytes, command: bytes = b"zINSTREAM\0") -> bytes:
    """The content of an INSTREAM request, checking its framing on the way."""
    assert sent.startswith(command)
    rest = sent[len(command) :]
    content = b""
    while True:
        (length,) = struct.unpack(">I", rest[:4])
        if length == 0:
            assert rest == b"\0\0\0\0", "nothing may follow the end of the stream"
            return content
        content += rest[4 : 4 + length]
        assert len(rest) >= 4 + length
        rest = rest[4 + length :]


def test_a_virus_is_found_by_name() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).scan(EICAR)
    assert endpoint.last.sent() == b"zINSTREAM\0" + struct.pack(">I", len(EICAR)) + EICAR + b"\0\0\0\0"
    endpoint.last.answer(FOUND)
    found = result(answer)
    assert found == ClamdResult(virus="Eicar-Test-Signature.UNOFFICIAL")
    assert found.infected


def test_clean_content() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).scan(b"hello")
    endpoint.last.answer(CLEAN)
    found = result(answer)
    assert found == ClamdResult()
    assert not found.infected


@given(size=st.integers(0, 5000), chunk=st.integers(1, 1500))
def test_streams_are_sent_in_chunks_that_add_up_to_the_content(size: int, chunk: int) -> None:
    content = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    endpoint = MemoryEndpoint(auto=True)
    source = io.BytesIO(content)
    answer = client(endpoint, chunk=chunk).scan_stream(source)
    sent = endpoint.last.sent()
    assert unstream(sent) == content
    assert sent.count(struct.pack(">I", chunk)) >= size // chunk  # chunk by chunk, not all at once
    endpoint.last.answer(CLEAN)
    assert not result(answer).infected
    assert source.closed


def test_the_stream_is_produced_as_the_connection_takes_it() -> None:
    endpoint = MemoryEndpoint(auto=True)
    client(endpoint, chunk=1024).scan(b"a" * 100_000)
    assert len(endpoint.last.sent(limit=1)) < 2 * 1024 + 20  # nothing read ahead of the transport
    assert unstream(endpoint.last.sent()) == b"a" * 100_000


def test_newline_delimited_commands() -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint, delimiter="n").scan(EICAR)
    assert unstream(endpoint.last.sent(), b"nINSTREAM\n") == EICAR
    endpoint.last.answer(b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\n")
    assert result(answer).virus == "Eicar-Test-Signature.UNOFFICIAL"
    with pytest.raises(ValueError):
        client(endpoint, delimiter="x").scan(b"")


def test_ping_and_version() -> None:
    endpoint = MemoryEndpoint(auto=True)
    clamd = client(endpoint)
    pong = clamd.ping()
    assert endpoint.last.sent() == b"zPING\0"
    endpoint.last.answer(b"PONG\0")
    assert result(pong) == "PONG"
    version = clamd.version()
    assert endpoint.last.sent() == b"zVERSION\0"
    endpoint.last.answer(b"ClamAV 1.4.6\0")
    assert result(version) == "ClamAV 1.4.6"
    bad = clamd.ping()
    endpoint.last.answer(UNKNOWN)
    with pytest.raises(ScannerProtocolError, match="UNKNOWN COMMAND"):
        result(bad)


def test_stream_max_length_exceeded_is_too_large_not_clean() -> None:
    endpoint = MemoryEndpoint(auto=True)
    source = io.BytesIO(b"A" * 200_000)
    answer = client(endpoint, chunk=65536).scan_stream(source)
    endpoint.last.sent(limit=70_000)  # clamd stops reading part way and answers
    endpoint.last.answer(TOO_LARGE, close=False)
    with pytest.raises(ScannerTooLarge, match="StreamMaxLength"):
        result(answer)
    assert endpoint.last.transport is not None and endpoint.last.transport.producer is None  # stopped
    assert endpoint.last.dropped
    assert source.closed


@pytest.mark.parametrize(
    "reply",
    [
        b"stream: Can't allocate memory ERROR\0",
        UNKNOWN,
        b"stream: FOUND\0",
        b"stream: maybe\0",
        b"OK\0",
    ],
)
def test_errors_and_nonsense_are_errors_never_clean(reply: bytes) -> None:
    endpoint = MemoryEndpoint(auto=True)
    answer = client(endpoint).scan(EICAR)
    endpoint.last.answer(reply)
    with pytest.raises(ScannerProtocolError):
        result(answer)


def test_killed_mid_stream_fails_and_closes_the_source() -> None:
    endpoint = MemoryEndpoint(auto=True)
    source = io.BytesIO(b"A" * 300_000)
    answer = client(endpoint, chunk=65536).scan_stream(source)
    endpoint.last.sent(limit=100_000)
    endpoint.last.close(clean=False)
    with pytest.raises(ScannerUnavailable, match="clamd closed the connection before its answer"):
        result(answer)
    assert source.closed


def test_unreachable_and_timeouts() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint()
    clamd = client(endpoint, clock, connect_timeout=2.0, timeout=30.0, max_connections=1)
    refused = clamd.scan(EICAR)
    endpoint.last.refuse()
    with pytest.raises(
        ScannerUnavailable, match=re.escape("cannot connect to clamd at unix:/run/clamav/clamd.ctl")
    ):
        result(refused)
    silent = clamd.scan(EICAR)
    clock.advance(2)
    with pytest.raises(ScannerTimeout, match="no connection within 2 s"):
        result(silent)
    slow = clamd.scan(EICAR)
    endpoint.last.succeed()
    clock.advance(30)
    with pytest.raises(ScannerTimeout, match="no answer within 30 s"):
        result(slow)
    assert endpoint.last.dropped
    assert clamd.connections.busy == 0


def test_cancelled_scan_closes_everything() -> None:
    endpoint = MemoryEndpoint(auto=True)
    clamd = client(endpoint, max_connections=1)
    source = io.BytesIO(b"A" * 100)
    answer = clamd.scan_stream(source)
    answer.cancel()
    with pytest.raises(CancelledError):
        result(answer)
    assert endpoint.last.dropped
    assert source.closed
    assert clamd.connections.busy == 0
