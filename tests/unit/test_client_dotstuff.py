"""The DATA encoder: dot-stuffing and CRLF across any chunking (outbound SMTP smuggling)."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred

from gateway.model import Envelope, Recipient
from gateway.smtp._dotstuff import DotStuffer, stuff
from gateway.smtp.client import ClientSettings
from tests.unit.test_client import Dialogue, result_of


def normalise(message: bytes) -> bytes:
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def unstuff(encoded: bytes) -> bytes:
    assert encoded.endswith(b".\r\n")
    body = encoded[:-3]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


def encode_in_chunks(message: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = []
    start = 0
    for cut in [*sorted(set(c % (len(message) + 1) for c in cuts)), len(message)]:
        out.append(stuffer.encode(message[start:cut]))
        start = max(start, cut)
    return b"".join(out) + stuffer.finish()


dotty = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\x00", b"\xff"]), max_size=60
).map(b"".join)


@given(message=st.one_of(dotty, st.binary(max_size=200)), cuts=st.lists(st.integers(0, 300), max_size=12))
def test_any_chunking_unstuffs_to_the_normalised_message(message: bytes, cuts: list[int]) -> None:
    encoded = encode_in_chunks(message, cuts)
    assert encoded == stuff(message)  # the chunking does not matter
    assert unstuff(encoded) == normalise(message)
    # the terminator appears only at the end; no bare CR or LF goes out
    assert b"\r\n.\r\n" not in encoded[:-3] or encoded == b"\r\n.\r\n"
    if encoded != b".\r\n":
        assert not encoded.startswith(b".\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", encoded) is None


def test_first_line_is_stuffed() -> None:
    assert stuff(b".hidden\r\n") == b"..hidden\r\n.\r\n"
    assert stuff(b".\r\nMAIL FROM:<x>\r\n") == b"..\r\nMAIL FROM:<x>\r\n.\r\n"


def test_line_ends_normalised() -> None:
    assert stuff(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n.\r\n"
    assert stuff(b"") == b".\r\n"


def test_cr_at_a_chunk_end_and_lf_at_the_next_start_is_one_line_end() -> None:
    stuffer = DotStuffer()
    out = stuffer.encode(b"a\r") + stuffer.encode(b"\n.b\r") + stuffer.encode(b"\n") + stuffer.finish()
    assert out == b"a\r\n..b\r\n.\r\n"


def test_outbound_smuggling_chunk_boundary(tmp_path: Path) -> None:
    """A "\\r\\n." that straddles the read chunk boundary must go out stuffed.

    Twisted's SMTPClient stuffed per chunk, so this message ended DATA early and
    injected a second message into the next hop (R3).
    """
    chunk = 64
    head = b"Subject: smuggle\r\n\r\n" + b"x" * (chunk - 22) + b"\r\n"
    assert len(head) == chunk
    evil = (
        b".\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n\r\nspoofed\r\n"
    )
    path = tmp_path / "message"
    path.write_bytes(head + evil)
    dialogue = Dialogue(settings=ClientSettings("gw.test", chunk_size=chunk))
    dialogue.open()
    envelope = Envelope("a@example.org", (Recipient("b@example.net"),))
    delivered = ensureDeferred(dialogue.session.deliver(envelope, envelope.rcpt_to, str(path), 100))
    dialogue.sent()
    dialogue.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
    body = dialogue.sent()
    assert body.count(b"\r\n.\r\n") == 1 and body.endswith(b"\r\n.\r\n")
    assert b"\r\n..\r\nMAIL FROM:<evil@attacker.example>" in body
    dialogue.server(b"250 ok\r\n")
    assert result_of(delivered)[0].result.delivered


def test_outbound_smuggling_bare_lf_dot_variants() -> None:
    for variant in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"):
        encoded = stuff(b"a" + variant + b"MAIL FROM:<evil@x>\r\n")
        assert encoded.count(b"\r\n.\r\n") == 1 and encoded.endswith(b"\r\n.\r\n"), variant
