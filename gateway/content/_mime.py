"""The MIME tree cut by offsets into the raw bytes, without recursion.

The stdlib's feed parser nests one generator per multipart level: a message nested
3,000 deep takes it half a second and then a RecursionError, and time grows with the
square of the depth. So the tree is cut here: each entity is a (start, end) slice of
the one raw buffer; its header block is parsed by the stdlib (``compat32``, which keeps
raw values for our own decoding), its body is split on its boundary with one regular
expression searched between offsets, so no body is copied until a leaf is decoded.
"""

from __future__ import annotations

import binascii
import contextlib
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

import attrs

__all__ = ["Entity", "decode_base64", "decode_body", "read_entity", "split_multipart"]

# Header lines: a field name and colon, or a continuation; the block ends at the first
# line that is neither (normally the empty line, which is consumed).
_HEADER_BLOCK = re.compile(rb"(?:From [^\n]*\n)?(?:[!-9;-~]+[ \t]*:[^\n]*(?:\n|\Z)|[ \t][^\n]*(?:\n|\Z))*")
_BLANK_LINE = re.compile(rb"\r?\n")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_BASE64 = bytes(byte for byte in range(256) if byte not in _BASE64_ALPHABET)
_BASE64_IGNORABLE = _BASE64_ALPHABET + b"= \t\r\n"  # anything else makes the data broken
_BASE64_PADDING = re.compile(rb"=[= \t\r\n]*")
# Encodings pasted together decoded one by one (about 1.5 us each), this many at most;
# the rest of the data is decoded as one, its padding ignored.
_MAX_SEGMENTS = 10_000

_HEADERS = BytesHeaderParser(policy=compat32)
# Bounds on what the stdlib's header code is given: its line handling costs about
# 5 us a line, and its parameter parsing grows with the square of a field's length
# (a 1 MB Content-Type of short parameters took 11 s).
MAX_HEADER = 1024 * 1024  # bytes of one entity's header block
MAX_MIME_FIELD = 8192  # characters of a Content-Type or Content-Disposition value
_MIME_FIELDS = ("content-type", "content-disposition")


@attrs.frozen
class Entity:
    """One MIME entity: its parsed header and where its body lies in the raw bytes."""

    header: Message
    body_start: int
    body_end: int
    defects: tuple[str, ...]
    truncated: bool = False  # the header block was longer than MAX_HEADER


def read_entity(raw: bytes, start: int, end: int) -> Entity:
    """The entity in ``raw[start:end]``: header block parsed, body located."""
    block = _HEADER_BLOCK.match(raw, start, end)
    header_end = block.end() if block else start
    defects: list[str] = []
    blank = _BLANK_LINE.match(raw, header_end, end)
    if blank:
        body_start = blank.end()
    else:
        body_start = header_end
        if header_end < end:
            defects.append("missing blank line after the header")
    truncated = header_end - start > MAX_HEADER
    if truncated:
        defects.append(f"header larger than {MAX_HEADER} bytes: the rest not read")
        header_end = raw.rfind(b"\n", start, start + MAX_HEADER) + 1 or start + MAX_HEADER
    header = _HEADERS.parsebytes(raw[start:header_end])
    defects.extend(_defect_name(defect) for defect in header.defects)
    for field in _MIME_FIELDS:
        value = header.get(field)
        if value is not None and len(str(value)) > MAX_MIME_FIELD:
            header.replace_header(field, str(value)[:MAX_MIME_FIELD])
            defects.append(f"{field} longer than {MAX_MIME_FIELD} characters: the rest not read")
            truncated = True
    return Entity(header, body_start, end, tuple(defects), truncated)


def _defect_name(defect: object) -> str:
    # "MissingHeaderBodySeparatorDefect" -> "missing header body separator"
    name = type(defect).__name__.removesuffix("Defect")
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def split_multipart(
    raw: bytes, start: int, end: int, boundary: str, most: int
) -> tuple[list[tuple[int, int]], list[str]]:
    """The first `most` parts of a multipart body as (start, end) offsets, and what was wrong.

    The search for the boundary starts with the literal separator, which the regular
    expression engine finds fast; that it begins a line is checked on each hit.
    """
    separator = b"--" + boundary.encode("utf-8", "surrogateescape")
    delimiter = re.compile(re.escape(separator) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    parts: list[tuple[int, int]] = []
    defects: list[str] = []
    part_start: int | None = None
    for match in delimiter.finditer(raw, start, end):
        # A delimiter starts a line (the byte before a body's start ends the header).
        if match.start() > 0 and raw[match.start() - 1] != 0x0A:
            continue
        if part_start is not None:
            parts.append((part_start, _before_newline(raw, part_start, match.start())))
            if len(parts) >= most:
                return parts, defects
        if match.group(1):
            return parts, defects if part_start is not None else ["multipart without its boundary"]
        part_start = match.end()
    if part_start is None:
        return [], ["multipart without its boundary"]
    defects.append("multipart without its closing boundary")
    parts.append((part_start, end))
    return parts, defects


def _before_newline(raw: bytes, start: int, end: int) -> int:
    """`end` less the line break that belongs to the following delimiter."""
    if end > start and raw[end - 1 : end] == b"\n":
        end -= 1
        if end > start and raw[end - 1 : end] == b"\r":
            end -= 1
    return end


def decode_base64(data: bytes) -> tuple[bytes, bool]:
    """Lenient base64: junk skipped, padding repaired -> (bytes, whether it was broken).

    Padding inside the data (encodings pasted together) starts a new encoding rather
    than ending the content, so nothing can be hidden after it.
    """
    if b"=" not in data.rstrip(b"= \t\r\n"):
        with contextlib.suppress(binascii.Error):
            return binascii.a2b_base64(data), bool(data.translate(None, _BASE64_IGNORABLE))
    # Padding inside, or missing, or a lone character at the end: broken, decoded by pieces.
    segments = _BASE64_PADDING.split(data, _MAX_SEGMENTS)
    return b"".join(_base64_quanta(segment) for segment in segments), True


def _base64_quanta(segment: bytes) -> bytes:
    """One encoding's alphabet characters decoded, a missing pad added."""
    clean = segment.translate(None, _NOT_BASE64)
    if len(clean) % 4 == 1:  # a lone character holds no whole byte
        clean = clean[:-1]
    return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))


def decode_body(data: bytes, encoding: str) -> tuple[bytes, tuple[str, ...]]:
    """A body with its Content-Transfer-Encoding undone -> (bytes, defects)."""
    encoding = encoding.strip().lower()
    if encoding == "base64":
        decoded, broken = decode_base64(data)
        return decoded, ("broken base64",) if broken else ()
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data), ()
    if encoding in ("", "7bit", "8bit", "binary"):
        return data, ()
    if encoding in ("x-uuencode", "uuencode", "x-uue", "uue"):
        return _uudecode(data)
    return data, (f"unknown transfer encoding {encoding[:40]!r}",)


def _uudecode(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    decoded: list[bytes] = []
    broken = False
    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith(b"begin "):
            break
    for line in lines:
        if line.strip() in (b"end", b"`", b""):
            if line.strip() == b"end":
                break
            continue
        try:
            decoded.append(binascii.a2b_uu(line))
        except binascii.Error:
            broken = True
    return b"".join(decoded), ("broken uuencode",) if broken else ()
