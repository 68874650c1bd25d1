"""The clamd client and the clamav filter against a real clamd (peer_clamd.Clamd, a test database).

EICAR is found by the MD5 signature sigtool made, alone or as a MIME attachment
(clamd decodes it), over TCP and over the UNIX socket, with NUL- and newline-ended
commands; a body signature finds a marker in a plain message. More than clamd's
StreamMaxLength is "too large", never clean. A clamd that hangs times out; one
killed mid-stream fails the check, and the message is deferred.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import reactor

from gateway.filters.chain import ChainRunner, Link, failure_verdict
from gateway.filters.clamav import ClamAV
from gateway.filters.testing import RecordingOutbox
from gateway.model import Direction, Envelope, Recipient
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.scanners import ScannerTimeout, ScannerTooLarge, ScannerUnavailable
from gateway.scanners._connection import client_endpoint
from gateway.scanners.clamd import ClamdClient, ClamdProtocol
from gateway.state.memory import MemoryStore
from tests.integration.peer_clamd import EICAR, EICAR_NAME, MARKER, MARKER_NAME, Clamd
from tests.integration.peers import require_program
from tests.integration.test_spamd import CLIENT, deliver, spin, wait
from tests.unit import test_clamd as recorded
from tests.unit.reception_driver import config

pytestmark = pytest.mark.integration

PLAIN = b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: invoice\r\n\r\nSee you.\r\n"


def with_attachment(name: str, payload: bytes) -> bytes:
    return (
        b"From: a@partner.test\r\nTo: bob@example.com\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--XX\r\nContent-Type: application/octet-stream; name=%s\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=%s\r\n\r\n%s--XX--\r\n"
        % (name.encode(), name.encode(), base64.encodebytes(payload).replace(b"\n", b"\r\n"))
    )


@pytest.fixture(scope="module")
def clamd() -> Iterator[Clamd]:
    require_program("clamd")
    require_program("sigtool")
    peer = Clamd(stream_max_length="1M")
    peer.start(timeout=60)
    yield peer
    peer.stop()


@pytest.fixture
def fresh_clamd() -> Iterator[Clamd]:
    """A clamd of this test's own (StreamMaxLength 50M), for the tests that kill it."""
    require_program("clamd")
    require_program("sigtool")
    peer = Clamd(stream_max_length="50M")
    peer.start(timeout=60)
    yield peer
    peer.stop()


def client(endpoint: str, **options: Any) -> ClamdClient:
    return ClamdClient(client_endpoint(reactor, endpoint), reactor, address=endpoint, **options)


def scanner(endpoint: str, **options: Any) -> tuple[ClamAV, RecordingOutbox, MemoryStore]:
    outbox = RecordingOutbox()
    store = MemoryStore(reactor)
    timeout = options.pop("timeout", 30.0)
    content_filter = ClamAV(
        client(endpoint, timeout=timeout),
        store=lambda: store,
        outbox=lambda: outbox,
        clock=reactor,
        hostname="gw.test",
        **options,
    )
    return content_filter, outbox, store


@pytest.mark.parametrize("over", ["tcp", "unix"])
@pytest.mark.parametrize("delimiter", ["z", "n"])
def test_eicar_is_found_and_clean_content_is_clean(clamd: Clamd, over: str, delimiter: str) -> None:
    endpoint = clamd.tcp_endpoint if over == "tcp" else clamd.unix_endpoint
    clamav = client(endpoint, delimiter=delimiter)
    assert wait(clamav.scan(EICAR)).virus == EICAR_NAME
    assert wait(clamav.scan(b"nothing to see" * 1000)).virus is None
    assert wait(clamav.ping()) == "PONG"
    assert wait(clamav.version()).startswith("ClamAV ")


def test_in_a_whole_message_clamd_finds_attachments_and_body_signatures(clamd: Clamd) -> None:
    clamav = client(clamd.unix_endpoint, chunk=1000)  # many chunks
    assert wait(clamav.scan(with_attachment("eicar.com", EICAR))).virus == EICAR_NAME
    assert wait(clamav.scan(PLAIN.replace(b"See you.", MARKER))).virus == MARKER_NAME
    assert wait(clamav.scan(PLAIN)).virus is None


def test_the_real_answers_are_the_recorded_transcripts(clamd: Clamd) -> None:
    """Contract: what tests/unit/test_clamd.py replays is what this clamd says, byte for byte."""
    clamav = client(clamd.tcp_endpoint)
    for content, answer in ((EICAR, recorded.FOUND), (b"hello", recorded.CLEAN), (b"A" * 1_100_000, None)):
        protocol = ClamdProtocol("INSTREAM", io.BytesIO(content))
        try:
            wait(clamav.connections.exchange(protocol))
        except ScannerUnavailable:
            pytest.fail("clamd closed without answering")
        assert bytes(protocol.buffer) == (answer or recorded.TOO_LARGE)


def test_more_than_stream_max_length_is_too_large_not_clean(clamd: Clamd) -> None:
    with pytest.raises(ScannerTooLarge, match="size limit exceeded"):
        wait(client(clamd.tcp_endpoint).scan(b"A" * 3_000_000))
    content_filter, _, _ = scanner(clamd.tcp_endpoint)
    reply, spool = deliver(content_filter, PLAIN + b"A" * 1_100_000)
    assert reply.code == 451 and spool.messages == {}
    passing, _, _ = scanner(clamd.tcp_endpoint, too_large="continue")
    reply, spool = deliver(passing, PLAIN + b"A" * 1_100_000)
    assert reply.code == 250
    [queue_id] = spool.messages
    assert b"X-Mailgate-ClamAV: not scanned" in spool.message_bytes(queue_id)


def test_the_filter_rejects_a_virus_tells_the_postmaster_and_counts_it(clamd: Clamd) -> None:
    content_filter, outbox, store = scanner(clamd.unix_endpoint)
    reply, spool = deliver(content_filter, with_attachment("eicar.com", EICAR))
    assert (reply.code, reply.enhanced, reply.text) == (554, "5.7.1", f"Virus found: {EICAR_NAME}")
    assert spool.messages == {}
    [(mail_from, rcpt_to, notice)] = outbox.sent
    assert (mail_from, rcpt_to) == ("", ("postmaster@example.com",))
    assert f"Virus:      {EICAR_NAME}".encode() in notice
    assert wait(store.count("virus", EICAR_NAME)) == 1
    reply, spool = deliver(content_filter, PLAIN)
    assert reply.code == 250 and len(spool.messages) == 1


def test_the_filter_scans_attachments_only_when_asked(clamd: Clamd) -> None:
    content_filter, outbox, _ = scanner(clamd.tcp_endpoint, scope="attachments", action="quarantine")
    reply, spool = deliver(content_filter, with_attachment("eicar.com", EICAR))
    assert reply.code == 250
    [queue_id] = spool.messages
    assert spool.load(queue_id).state == "hold"
    assert b'attachment "eicar.com"' in outbox.sent[0][2]
    reply, spool = deliver(content_filter, PLAIN.replace(b"See you.", MARKER))  # the text is not scanned
    assert reply.code == 250
    [queue_id] = spool.messages
    assert spool.load(queue_id).state == "incoming"


def test_clamd_down_defers(tmp_path: Any) -> None:
    nowhere = f"unix:{tmp_path}/clamd.sock"  # no clamd there
    with pytest.raises(ScannerUnavailable, match="cannot connect to clamd"):
        wait(client(nowhere).ping())
    content_filter, outbox, _ = scanner(nowhere)
    reply, spool = deliver(content_filter, with_attachment("eicar.com", EICAR))
    assert reply.code == 451 and spool.messages == {} and outbox.sent == []


def test_clamd_hung_times_out_without_hanging(clamd: Clamd) -> None:
    clamd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ScannerTimeout, match="no answer within 2 s"):
            wait(client(clamd.tcp_endpoint, timeout=2.0).scan(EICAR), timeout=10)
        assert time.monotonic() - started < 5
        content_filter, _, _ = scanner(clamd.unix_endpoint, timeout=2.0)
        reply, _spool = deliver(content_filter, with_attachment("eicar.com", EICAR))
        assert reply.code == 451
    finally:
        clamd.resume()
    assert wait(client(clamd.tcp_endpoint).ping()) == "PONG"


def test_clamd_killed_mid_stream_fails_the_scan_and_defers(fresh_clamd: Clamd) -> None:
    clamav = client(fresh_clamd.tcp_endpoint, timeout=60)
    fresh_clamd.pause()  # it stops reading: the stream stalls part way, the socket buffers full
    big = os.urandom(20_000_000)
    protocol = ClamdProtocol("INSTREAM", io.BytesIO(big))
    scanning = clamav.connections.exchange(protocol)
    content_filter, _, _ = scanner(fresh_clamd.unix_endpoint, timeout=60)
    ending = _deliver_later(content_filter, PLAIN + big[:5_000_000])
    spin(1.0)
    assert protocol.sender is not None
    assert 0 < protocol.sender.sent < len(big)  # mid-stream
    started = time.monotonic()
    fresh_clamd.kill()
    with pytest.raises(ScannerUnavailable):
        wait(scanning, timeout=10)
    assert wait(ending, timeout=10).code == 451
    assert time.monotonic() - started < 10  # at once, not by a timeout
    assert clamav.connections.busy == 0


def _deliver_later(content_filter: ClamAV, message: bytes) -> Any:
    """The end-of-data reply's Deferred for one message, left to run."""
    link = Link(content_filter, 60.0, failure_verdict("defer", "clamav"))
    reception = Reception(MemorySpool(), config("").relay, ChainRunner({Direction.INBOUND: (link,)}, reactor))
    checks = reception.open_session(CLIENT)
    incoming = checks.new_message(CLIENT)
    incoming.write(message)
    return checks.accept(CLIENT, Envelope("a@partner.test", (Recipient("bob@example.com"),)), incoming)
