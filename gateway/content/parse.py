"""parse_message: raw bytes -> ParsedMessage, bounded by ContentLimits, never raising.

The MIME tree is walked with an explicit stack (see `gateway.content._mime` for why
not the stdlib's feed parser), in document order. Each leaf is decoded: its transfer
encoding undone, then either its text kept (text/plain, text/html and text/enriched
parts that are not attachments) or it becomes an `Attachment`. message/rfc822 parts
are read as messages one level deeper.

Alternatives: of the branches of a multipart/alternative, a branch whose text is
contained in another's (after folding space and case) is dropped, so the usual
plain + HTML pair gives its words once; branches that say different things are all
kept, so text hidden in the branch a filter would not have chosen is still seen.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import NamedTuple

from gateway.content import Attachment, ContentLimits, ParsedMessage
from gateway.content._charset import decode_text, decode_words
from gateway.content._html import html_text
from gateway.content._mime import MAX_HEADER, decode_body, read_entity, split_multipart
from gateway.content._sniff import sniff_type

__all__ = ["parse_message"]

_MESSAGES = frozenset({"message/rfc822", "message/global", "message/news"})
_MAX_DEFECTS = 100
_MAX_COMPARED = 8  # branches of an alternative compared with each other
_MAX_HEADERS_TOTAL = 8 * MAX_HEADER  # header bytes of all the parts together (see _mime)
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")
_FOLD_SPACE = re.compile(r"\s+")


class _Pending(NamedTuple):
    """An entity still to read: where it is, how deep, and which alternative it is part of."""

    buffer: bytes
    start: int
    end: int
    depth: int
    default_type: str
    branch: tuple[int, int] | None  # (alternative's number, branch index)


class _Walk:
    def __init__(self, raw: bytes, limits: ContentLimits) -> None:
        self.limits = limits
        self.stack = [_Pending(raw, 0, len(raw), 0, "text/plain", None)]
        self.headers: tuple[tuple[str, str], ...] = ()
        self.texts: list[tuple[tuple[int, int] | None, str]] = []
        self.text_chars = 0
        self.attachments: list[Attachment] = []
        self.defects: dict[str, None] = {}
        self.truncated = False
        self.html = False
        self.parts = 0
        self.alternatives = 0
        self.header_bytes = 0

    def defect(self, *problems: str) -> None:
        for problem in problems:
            if len(self.defects) < _MAX_DEFECTS:
                self.defects[problem] = None

    def limit(self, problem: str) -> None:
        self.truncated = True
        self.defect(problem)

    def run(self) -> None:
        while self.stack:
            if self.parts >= self.limits.max_parts:
                self.limit(f"more than {self.limits.max_parts} MIME parts: the rest not read")
                return
            if self.header_bytes > _MAX_HEADERS_TOTAL:
                self.limit(f"more than {_MAX_HEADERS_TOTAL} bytes of part headers: the rest not read")
                return
            self.parts += 1
            pending = self.stack.pop()
            try:
                self.read(pending)
            except Exception as error:  # a part we could not read costs that part, not the message
                self.defect(f"unreadable part ({type(error).__name__})")

    def read(self, pending: _Pending) -> None:
        entity = read_entity(pending.buffer, pending.start, pending.end)
        header = entity.header
        _unescape_mime_fields(header)
        self.defect(*entity.defects)
        self.truncated = self.truncated or entity.truncated
        self.header_bytes += entity.body_start - pending.start
        if pending.depth == 0:
            self.headers = _decoded_headers(header, self)
        header.set_default_type(pending.default_type)
        content_type = header.get_content_type()
        main_type = content_type.partition("/")[0]
        body = (pending.buffer, entity.body_start, entity.body_end)
        if main_type == "multipart" and self.descend(pending, header, content_type, body):
            return
        if content_type in _MESSAGES and self.inner_message(pending, header, body):
            return
        self.leaf(pending, header, content_type, body)

    def deeper(self, pending: _Pending) -> bool:
        """Whether the children of `pending` are within max_depth (recording it if not)."""
        if pending.depth + 1 > self.limits.max_depth:
            self.limit(f"MIME nested deeper than {self.limits.max_depth}: not read")
            return False
        return True

    def descend(
        self, pending: _Pending, header: Message, content_type: str, body: tuple[bytes, int, int]
    ) -> bool:
        """Pushes a multipart's children; False if it has none to read (then it is read as text)."""
        boundary = header.get_boundary()
        if not boundary:
            self.defect("multipart without a boundary parameter")
            return False
        if not self.deeper(pending):
            return True
        buffer, start, end = body
        parts, problems = split_multipart(
            buffer, start, end, boundary, self.limits.max_parts - self.parts + 1
        )
        self.defect(*problems)
        if not parts:
            return False
        default_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        number = None
        if content_type == "multipart/alternative":
            self.alternatives += 1
            number = self.alternatives
        # Pushed last first, so they are read in document order.
        for index in range(len(parts) - 1, -1, -1):
            branch = (number, index) if number is not None else pending.branch
            part_start, part_end = parts[index]
            self.stack.append(_Pending(buffer, part_start, part_end, pending.depth + 1, default_type, branch))
        return True

    def inner_message(self, pending: _Pending, header: Message, body: tuple[bytes, int, int]) -> bool:
        """Pushes a message/rfc822's message; False if it is not to be read as one."""
        if not self.deeper(pending):
            return True
        buffer, start, end = body
        encoding = str(header.get("content-transfer-encoding", ""))
        if encoding.strip().lower() in ("base64", "quoted-printable"):
            # Not allowed by RFC 2046, but sent: the message is inside the encoding.
            buffer, problems = decode_body(buffer[start:end], encoding)
            self.defect("encoded message/rfc822", *problems)
            start, end = 0, len(buffer)
        self.stack.append(_Pending(buffer, start, end, pending.depth + 1, "text/plain", pending.branch))
        return True

    def leaf(
        self, pending: _Pending, header: Message, content_type: str, body: tuple[bytes, int, int]
    ) -> None:
        buffer, start, end = body
        payload, problems = decode_body(buffer[start:end], str(header.get("content-transfer-encoding", "")))
        self.defect(*problems)
        disposition = (header.get_content_disposition() or "").lower()
        filename, name_problems = _filename(header)
        self.defect(*name_problems)
        # A multipart that could not be split is read as text, so its words are not lost.
        is_text = content_type.partition("/")[0] in ("text", "multipart")
        if is_text and disposition != "attachment" and filename is None:
            self.text(pending, header, content_type, payload)
            return
        self.attachments.append(
            Attachment(
                filename=filename,
                content_type=content_type,
                payload=payload,
                depth=pending.depth,
                defects=problems + name_problems,
                disposition=disposition,
                detected_type=sniff_type(payload),
            )
        )

    def text(self, pending: _Pending, header: Message, content_type: str, payload: bytes) -> None:
        if self.text_chars > 2 * self.limits.max_text:
            self.limit(f"more than {self.limits.max_text} characters of text: the rest not read")
            return
        charset = header.get_param("charset")
        label = charset if isinstance(charset, str) else None
        # Bytes beyond what can become max_text characters are not decoded (4: UTF-8's widest).
        budget = 4 * (2 * self.limits.max_text - self.text_chars + 1)
        if len(payload) > budget:
            self.limit(f"more than {self.limits.max_text} characters of text: the rest not read")
        text, problems = decode_text(payload[:budget], label)
        self.defect(*problems)
        if content_type == "text/html" or (content_type != "text/plain" and _looks_like_html(text)):
            text, problems = html_text(text)
            self.defect(*problems)
            self.html = True
        text = text.replace("\r\n", "\n").strip()
        if text:
            self.texts.append((pending.branch, text))
            self.text_chars += len(text)

    def joined_text(self) -> str:
        """The text parts in order, each alternative's repeated branches given once, bounded."""
        kept: list[str] = []
        done: set[int] = set()
        for branch, text in self.texts:
            if branch is None:
                kept.append(text)
                continue
            number = branch[0]
            if number in done:
                continue
            done.add(number)
            branches = [
                (other, text) for other, text in self.texts if other is not None and other[0] == number
            ]
            kept.extend(_distinct_branches(branches))
        joined = "\n\n".join(kept)
        if len(joined) > self.limits.max_text:
            self.limit(f"more than {self.limits.max_text} characters of text: the rest not read")
            joined = joined[: self.limits.max_text]
        return joined


def _distinct_branches(texts: list[tuple[tuple[int, int], str]]) -> list[str]:
    """The branches of one alternative, less any whose text another branch already says."""
    branches: dict[int, list[str]] = {}
    for (_number, index), text in texts:
        branches.setdefault(index, []).append(text)
    joined = {index: "\n\n".join(parts) for index, parts in branches.items()}
    if len(joined) > _MAX_COMPARED:  # not a real alternative; comparing costs the square
        return list(joined.values())
    folded = {index: _FOLD_SPACE.sub(" ", text).strip().lower() for index, text in joined.items()}
    kept: list[str] = []
    for index, text in joined.items():
        contained = any(
            other != index
            and folded[index] in folded[other]
            and (len(folded[other]) > len(folded[index]) or other < index)
            for other in folded
        )
        if not contained:
            kept.append(text)
    return kept


def _looks_like_html(text: str) -> bool:
    head = text[:512].lstrip().lower()
    return head.startswith(("<!doctype html", "<html"))


def _has_raw_8bit(value: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in value)


def _unescape_mime_fields(header: Message) -> None:
    """Raw 8-bit names in Content-Type/-Disposition made text before their parameters are read.

    (compat32 would give the parameter parser U+FFFD for each such byte.)
    """
    for field in ("content-type", "content-disposition"):
        for name, value in header.raw_items():
            if name.lower() == field and isinstance(value, str) and _has_raw_8bit(value):
                text, _problems = decode_text(value.encode("ascii", "surrogateescape"), None)
                header.replace_header(field, text)
                break


def _decoded_headers(header: Message, walk: _Walk) -> tuple[tuple[str, str], ...]:
    decoded: list[tuple[str, str]] = []
    for name, value in header.raw_items():
        text, problems = decode_words(_UNFOLD.sub("", str(value)))
        walk.defect(*problems)
        decoded.append((name, text.strip()))
    return tuple(decoded)


def _filename(header: Message) -> tuple[str | None, tuple[str, ...]]:
    """The part's file name, decoded (RFC 2231 parameters, encoded words, raw 8-bit)."""
    value = header.get_param("filename", None, "content-disposition")
    if value is None:
        value = header.get_param("name", None, "content-type")
    if value is None:
        return None, ()
    if isinstance(value, tuple):
        charset, _language, text = value
        raw = str(text).encode("latin-1", "surrogateescape")
        name, problems = decode_text(raw, str(charset) if charset else None)
    else:
        name, problems = decode_words(str(value))
    # The name as sent (a filter judging "..\\evil.exe" wants to see it), less NUL bytes,
    # which would cut it short in C code further on (clamd, archive tools).
    name = name.replace("\x00", "").strip()
    return name, problems


_DEFAULT_LIMITS = ContentLimits()


def parse_message(raw: bytes, limits: ContentLimits = _DEFAULT_LIMITS) -> ParsedMessage:
    """The message's headers, text and attachments, decoded as far as its MIME goes.

    Never raises on any input: what was malformed is in ``defects``, and ``truncated``
    says a limit stopped the parse before the end.
    """
    size = len(raw)
    walk = _Walk(raw[: limits.max_bytes] if size > limits.max_bytes else raw, limits)
    if size > limits.max_bytes:
        walk.limit(f"larger than {limits.max_bytes} bytes: the rest not read")
    walk.run()
    text = walk.joined_text()
    return ParsedMessage(
        headers=walk.headers,
        text=text,
        attachments=tuple(walk.attachments),
        defects=tuple(walk.defects),
        size=size,
        truncated=walk.truncated,
        html=walk.html,
        parts=walk.parts,
    )
