"""The DATA encoder: CRLF line ends and dot-stuffing, correct across chunk boundaries.

Twisted's `SMTPClient` stuffs each chunk on its own, so a line-start dot at the
start of a chunk goes out unstuffed (outbound SMTP smuggling, R3 in the notes).
`DotStuffer` carries its state (at the start of a line? a CR just seen?) from
one chunk to the next, so the output is the same whatever the chunking.
"""

from __future__ import annotations


class DotStuffer:
    """Encodes a message for DATA, chunk by chunk.

    Every bare LF and bare CR becomes CRLF, every line that starts with "."
    gets one more (RFC 5321 section 4.5.2), the first line included; `finish`
    returns the terminator, with a CRLF before it if the message did not end
    with one.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._after_cr = False  # the last chunk ended in CR, already sent as CRLF

    def encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return b""
        if chunk[-1:] == b"\r":
            self._after_cr = True
        lines = chunk.count(b"\n")
        if chunk.count(b"\r") == lines and chunk.count(b"\r\n") == lines:
            text = chunk  # every CR and every LF is already part of a CRLF (the usual case)
        else:
            # CRLF -> LF, lone CR -> LF, then every LF -> CRLF: no CR or LF is left bare
            text = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        text = text.replace(b"\r\n.", b"\r\n..")
        if self._line_start and text[:1] == b".":
            text = b"." + text
        self._line_start = text[-1:] == b"\n"
        return text

    def finish(self) -> bytes:
        """The end of DATA: ".\\r\\n", after a CRLF if the last line had none."""
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


def stuff(message: bytes) -> bytes:
    """The whole message encoded for DATA, terminator included."""
    stuffer = DotStuffer()
    return stuffer.encode(message) + stuffer.finish()
