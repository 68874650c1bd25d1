"""The message-data hot path of the SMTP server: DATA framing, bare CR/LF, hop count.

Everything works on large chunks with C-level `bytes` methods (`find`, `count`,
`replace`); no Python code runs per line. This is what lets one core take well over
a thousand 10 KB messages a second.
"""

from __future__ import annotations

_TERMINATOR = b"\r\n.\r\n"
_EMPTY_MESSAGE = b".\r\n"


class DotReader:
    """Finds the end of a DATA section and removes dot-stuffing (RFC 5321 4.5.2).

    Only ``CRLF . CRLF`` ends the data. ``LF . LF``, ``LF . CRLF``, ``CRLF . LF`` and
    ``CR . CR`` are content (the SMTP smuggling family); the bare line ends they
    contain are then caught by `NewlineChecker`.

    At most one partial line is held back; a partial line longer than
    `flush_size` is handed out anyway, so memory stays bounded whatever the
    client sends.
    """

    def __init__(self, flush_size: int = 64 * 1024) -> None:
        self.flush_size = flush_size
        self._at_line_start = True  # the bytes handed out so far end with CRLF

    def read(self, buffer: bytes | bytearray, start: int) -> tuple[bytes, int, bool]:
        """Take what can be taken from ``buffer[start:]``.

        Returns the unstuffed content (possibly empty), the position up to which
        the buffer was consumed, and whether the end of data was reached.
        """
        available = len(buffer) - start
        if self._at_line_start and buffer[start : start + 1] == b".":
            if buffer[start : start + 3] == _EMPTY_MESSAGE:
                return b"", start + 3, True
            if available < 3 and _EMPTY_MESSAGE.startswith(buffer[start:]):
                return b"", start, False  # maybe the end: wait for more
        found = buffer.find(_TERMINATOR, start)
        if found >= 0:
            end, consumed, finished = found + 2, found + 5, True
        else:
            last = buffer.rfind(b"\r\n", start)
            if last >= 0:
                end = consumed = last + 2
            elif available > self.flush_size:
                # one very long line: pass it on, keeping a trailing CR for its LF
                end = consumed = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
            else:
                return b"", start, False
            finished = False
        content = bytes(buffer[start:end])
        if self._at_line_start and content[:1] == b".":
            content = content[1:]
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        self._at_line_start = content.endswith(b"\r\n") or (not content and self._at_line_start)
        return content, consumed, finished


class NewlineChecker:
    """Notices a CR or LF that is not part of a CRLF pair, across chunk boundaries."""

    def __init__(self) -> None:
        self.bare = False
        self._pending_cr = False  # the previous chunk ended with CR

    def feed(self, chunk: bytes) -> bool:
        """Whether this chunk has a bare CR or LF (`bare` remembers any so far)."""
        if not chunk:
            return False
        pairs = chunk.count(b"\r\n")
        carriage = chunk.count(b"\r")
        if self._pending_cr:
            carriage += 1
            if chunk[:1] == b"\n":
                pairs += 1
        pending = chunk.endswith(b"\r")
        bare = chunk.count(b"\n") != pairs or carriage - pairs - pending != 0
        self.bare = self.bare or bare
        self._pending_cr = pending
        return bare

    def finish(self) -> bool:
        """Whether the whole content had a bare CR or LF."""
        return self.bare or self._pending_cr


def normalize_newlines(chunk: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF (used when bare ones are allowed)."""
    return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class HeaderScanner:
    """Counts ``Received:`` header fields in the message header, for the hop limit.

    Keeps at most `limit` bytes of header; a header longer than that is counted as
    far as it was kept, which already exceeds any sane hop limit.
    """

    def __init__(self, limit: int = 256 * 1024) -> None:
        self.limit = limit
        self.received = 0
        self.done = False
        self._header = bytearray(b"\n")  # so the first line also follows a newline

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        searched = max(len(self._header) - 3, 0)
        self._header += chunk
        end = self._header.find(b"\n\r\n", searched)
        if end >= 0 or len(self._header) > self.limit:
            header = bytes(self._header if end < 0 else self._header[: end + 1])
            self.received = header.lower().count(b"\nreceived:")
            self.done = True
            self._header = bytearray()

    def finish(self) -> int:
        """The count, also for a message that is all header."""
        if not self.done:
            self.received = bytes(self._header).lower().count(b"\nreceived:")
            self.done = True
            self._header = bytearray()
        return self.received


class HeaderStripper:
    """Takes header fields named ``X-Mailgate-*`` out of a message's header as it streams.

    Our filters record their verdicts in such fields, right after our Received
    header; a client must not be able to forge them for the servers behind us
    (SpamAssassin drops incoming X-Spam-* fields for the same reason). Only the
    header is looked at (up to the first empty line); a header line is held back
    until its end is seen, but a line longer than `limit` is decided on its first
    `limit` octets and then streamed, so memory stays bounded.
    """

    PREFIX = b"x-mailgate-"

    def __init__(self, limit: int = 8192) -> None:
        self.limit = limit
        self.done = False
        self._partial = b""  # the start of a header line whose end has not come yet
        self._dropping = False  # the current field is ours to drop (continuations too)
        self._streaming: bool | None = None  # inside an over-long line: keep it (True) or not

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return chunk
        out: list[bytes] = []
        data = self._partial + chunk if self._partial else chunk
        self._partial = b""
        start = 0
        if self._streaming is not None:  # the rest of an over-long line
            end = data.find(b"\n")
            if end < 0:
                return data if self._streaming else b""
            if self._streaming:
                out.append(data[: end + 1])
            self._streaming = None
            start = end + 1
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start : end + 1]
            start = end + 1
            if line == b"\r\n" or line == b"\n":  # the end of the header
                self.done = True
                out.append(line)
                out.append(data[start:])
                return b"".join(out)
            if not self._keep(line):
                continue
            out.append(line)
        rest = data[start:]
        if len(rest) > self.limit:
            keep = self._keep(rest)
            self._streaming = keep
            if keep:
                out.append(rest)
        else:
            self._partial = rest
        return b"".join(out)

    def _keep(self, line: bytes) -> bool:
        if line[:1] in (b" ", b"\t"):  # a continuation belongs to the field before it
            return not self._dropping
        self._dropping = line[: len(self.PREFIX)].lower() == self.PREFIX
        return not self._dropping

    def finish(self) -> bytes:
        """What is still held back at the end of the message (a header with no body)."""
        rest, self._partial = self._partial, b""
        if self.done or not rest:
            return rest
        self.done = True
        return rest if self._keep(rest) else b""
