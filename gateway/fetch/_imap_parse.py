"""IMAP4rev1 server responses, read incrementally and bounded (RFC 3501 section 7, 9).

`ResponseReader` is fed the bytes the server sends and gives back whole
responses: a `StatusResponse` (tagged or untagged OK/NO/BAD, untagged BYE and
PREAUTH, with the optional [CODE args]), a `DataResponse` (`* 3 EXISTS`,
`* CAPABILITY ...`, `* 5 FETCH (...)`) or a `ContinuationRequest` (`+ ...`).
Data values are atoms (`str`), strings (quoted or literal: `bytes`), NIL
(`None`), parenthesised lists (`tuple`), or `Streamed` for a message body.

Everything is bounded: a line by `max_line`, what one response keeps in
memory by `max_buffered`, a literal by `max_literal`. The literal after
`BODY[]` in a FETCH response is not kept: while `body_sink` is set it is
handed to it piece by piece as it arrives (a message is never held whole).
Anything the grammar does not allow is a `ProtocolViolation`.

Also here: modified UTF-7 for folder names (RFC 3501 5.1.3) and the quoting
of command arguments.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable

import attrs

from gateway.fetch import ProtocolViolation

__all__ = [
    "ContinuationRequest",
    "DataResponse",
    "Response",
    "ResponseReader",
    "StatusResponse",
    "Streamed",
    "Value",
    "decode_folder",
    "encode_folder",
    "fetch_attributes",
    "number_value",
    "quoted",
    "sequence_set",
]

MAX_LINE = 64 * 1024  # one line of a response; CAPABILITY and FETCH lines are far shorter
MAX_BUFFERED = 1024 * 1024  # what one response may keep in memory, literals included
MAX_DEPTH = 64  # nested parentheses (BODYSTRUCTURE nests; nothing we ask for nests deeply)

STATUS_WORDS = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})


@attrs.frozen
class Streamed:
    """A literal handed to the body sink as it arrived, not kept: its size in octets."""

    size: int


Value = str | bytes | None | Streamed | tuple["Value", ...]


@attrs.frozen
class StatusResponse:
    """OK, NO, BAD (tagged or untagged), BYE or PREAUTH; `tag` is "*" when untagged.

    `code` is the response code's name in upper case ("UIDVALIDITY"; "" when
    there is none), `code_text` what follows it inside the brackets.
    """

    tag: str
    status: str
    code: str
    code_text: str
    text: str

    @property
    def tagged(self) -> bool:
        return self.tag != "*"


@attrs.frozen
class DataResponse:
    """An untagged data response.

    `* 3 EXISTS` is ("EXISTS", 3, ()); `* SEARCH 2 4` is ("SEARCH", None, ("2", "4")).
    """

    kind: str
    number: int | None
    values: tuple[Value, ...]


@attrs.frozen
class ContinuationRequest:
    """`+ text`: the server waits for the rest of a command (a literal, a SASL answer, IDLE's DONE)."""

    text: str


Response = StatusResponse | DataResponse | ContinuationRequest

_LITERAL_AT_END = re.compile(rb"\{(\d{1,19})\}\Z")
_TAG = re.compile(r"[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]+\Z")  # ASTRING-CHAR without "+" alone, "*"
_STATUS_LINE = re.compile(rb"(?:\*|[^ ]+) (?:OK|NO|BAD|BYE|PREAUTH)(?: |\Z)", re.IGNORECASE)
_BODY_BEFORE_LITERAL = re.compile(rb"(?:BODY\[\]|BODY\.PEEK\[\]|RFC822)(?:<0>)? ?\{\d+\}\Z", re.IGNORECASE)
_FETCH_START = re.compile(rb"\* \d+ FETCH \(", re.IGNORECASE)


class ResponseReader:
    """Turns the server's bytes into responses, one at a time, within the bounds.

    `feed(data)` adds bytes; `next_response()` gives the next whole response or
    None if more bytes are needed. A literal announced after `BODY[]` in a
    FETCH response goes to `body_sink` while it is set (it is cleared after
    one body, so a second one cannot be written into the same message); an
    exception from the sink is kept in `sink_error` and the rest of the
    literal dropped, so the session stays in step with the server.
    """

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE,
        max_buffered: int = MAX_BUFFERED,
        max_literal: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_line = max_line
        self.max_buffered = max_buffered
        self.max_literal = max_literal
        self.body_sink: Callable[[bytes], None] | None = None
        self.sink_error: BaseException | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the response's lines so far; all but the last end in {n}
        self._literals: list[bytes | Streamed] = []
        self._kept = 0  # octets of this response held in memory
        self._literal_left = -1  # octets of the current literal still to come; -1: reading a line
        self._literal_parts: list[bytes] = []
        self._literal_size = 0
        self._streaming: Callable[[bytes], None] | None = None

    @property
    def pending(self) -> int:
        """Octets received but not yet part of a response given out."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_response(self) -> Response | None:
        while True:
            if self._literal_left >= 0:
                if not self._read_literal():
                    return None
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    raise ProtocolViolation(f"a response line longer than {self.max_line} octets")
                return None
            if end > self.max_line:
                raise ProtocolViolation(f"a response line longer than {self.max_line} octets")
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._keep(len(line))
            self._lines.append(line)
            literal = _LITERAL_AT_END.search(line)
            if literal is not None and not (len(self._lines) == 1 and _is_text_line(line)):
                self._start_literal(int(literal.group(1)), line)
                continue
            lines, literals = self._lines, self._literals
            self._lines, self._literals, self._kept = [], [], 0
            return parse_response(lines, literals)

    def _keep(self, size: int) -> None:
        self._kept += size
        if self._kept > self.max_buffered:
            raise ProtocolViolation(f"a response larger than {self.max_buffered} octets")

    def _start_literal(self, size: int, line: bytes) -> None:
        if size > self.max_literal:
            raise ProtocolViolation(f"a literal of {size} octets (the limit is {self.max_literal})")
        self._streaming = None
        if (
            self.body_sink is not None
            and _BODY_BEFORE_LITERAL.search(line)
            and _FETCH_START.match(self._lines[0])
        ):
            self._streaming, self.body_sink = self.body_sink, None
        else:
            self._keep(size)
        self._literal_left = size
        self._literal_size = size
        self._literal_parts = []

    def _read_literal(self) -> bool:
        """Take what is there of the current literal; True once it is complete."""
        take = min(self._literal_left, len(self._buffer))
        if take:
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            self._literal_left -= take
            if self._streaming is None:
                self._literal_parts.append(piece)
            elif self.sink_error is None:
                try:
                    self._streaming(piece)
                except Exception as error:  # the spool's problem: reported by the command
                    self.sink_error = error
        if self._literal_left:
            return False
        self._literal_left = -1
        if self._streaming is None:
            self._literals.append(b"".join(self._literal_parts))
        else:
            self._literals.append(Streamed(self._literal_size))
            self._streaming = None
        self._literal_parts = []
        return True


def _is_text_line(line: bytes) -> bool:
    """A status or continuation line: its end is human text, where "{5}" is not a literal."""
    return line.startswith(b"+") or _STATUS_LINE.match(line) is not None


# -- parsing one response -----------------------------------------------------------------------


def parse_response(lines: list[bytes], literals: list[bytes | Streamed]) -> Response:
    """One response from its lines (without CRLF) and the literals between them."""
    first = lines[0]
    if first.startswith(b"+"):
        return ContinuationRequest(_text(first[2:] if first.startswith(b"+ ") else first[1:]))
    tag, space, rest = first.partition(b" ")
    tag_text = _text(tag)
    if not space or not (tag == b"*" or _TAG.match(tag_text)):
        raise ProtocolViolation(f"not an IMAP response: {_show(first)}")
    word, _, after = rest.partition(b" ")
    keyword = _text(word).upper()
    if keyword in STATUS_WORDS:
        if tag != b"*" and keyword not in ("OK", "NO", "BAD"):
            raise ProtocolViolation(f"a tagged {keyword}: {_show(first)}")
        return _status(tag_text, keyword, after)
    if tag != b"*":
        raise ProtocolViolation(f"a tagged response that is not OK, NO or BAD: {_show(first)}")
    values = _values([rest, *lines[1:]], literals)
    if not values or not isinstance(values[0], str):
        raise ProtocolViolation(f"an untagged response without a name: {_show(first)}")
    if _is_number(values[0]):
        if len(values) < 2 or not isinstance(values[1], str) or not values[1][:1].isalpha():
            raise ProtocolViolation(f"a number without a response name: {_show(first)}")
        return DataResponse(values[1].upper(), _number(values[0]), values[2:])
    return DataResponse(values[0].upper(), None, values[1:])


def _status(tag: str, status: str, rest: bytes) -> StatusResponse:
    code = code_text = ""
    if rest.startswith(b"["):
        end = rest.find(b"]")
        if end < 0:
            raise ProtocolViolation(f"an unclosed response code: {_show(rest)}")
        inside = _text(rest[1:end])
        name, _, code_text = inside.partition(" ")
        code = name.upper()
        rest = rest[end + 1 :].lstrip(b" ")
    return StatusResponse(tag, status, code, code_text, _text(rest))


def _values(lines: list[bytes], literals: list[bytes | Streamed]) -> tuple[Value, ...]:
    """The tokens of a data response, lists nested, literals put where they were announced."""
    stack: list[list[Value]] = [[]]
    for index, line in enumerate(lines):
        literal = literals[index] if index < len(literals) else None
        if literal is not None:
            marker = _LITERAL_AT_END.search(line)
            assert marker is not None
            line = line[: marker.start()]
        for token in _tokens(line):
            if token == "(":
                if len(stack) > MAX_DEPTH:
                    raise ProtocolViolation(f"lists nested deeper than {MAX_DEPTH}")
                stack.append([])
            elif token == ")":
                if len(stack) == 1:
                    raise ProtocolViolation(f"an unopened ')': {_show(line)}")
                closed = tuple(stack.pop())
                stack[-1].append(closed)
            elif isinstance(token, _Token):
                stack[-1].append(token.value)
        if literal is not None:
            stack[-1].append(literal)
    if len(stack) != 1:
        raise ProtocolViolation(f"an unclosed '(': {_show(lines[-1])}")
    return tuple(stack[0])


@attrs.frozen
class _Token:
    value: Value


_ATOM_END = frozenset(b' ()"{')


def _tokens(line: bytes) -> Iterable[str | _Token]:
    """Lexes one line: "(" and ")", or a `_Token` holding an atom, a quoted string or NIL."""
    position, size = 0, len(line)
    while position < size:
        char = line[position]
        if char == 0x20:
            position += 1
        elif char in (0x28, 0x29):  # ( )
            yield chr(char)
            position += 1
        elif char == 0x22:  # "
            value, position = _quoted(line, position + 1)
            yield _Token(value)
        elif char == 0x7B:  # {: a literal is only allowed at the end of a line
            raise ProtocolViolation(f"a literal not at the end of a line: {_show(line)}")
        else:
            start = position
            while position < size and line[position] not in _ATOM_END:
                if line[position] == 0x5B:  # [: a section ("BODY[HEADER.FIELDS (TO)]") runs to its ]
                    close = line.find(b"]", position)
                    if close < 0:
                        raise ProtocolViolation(f"an unclosed '[': {_show(line)}")
                    position = close
                elif line[position] < 0x20 or line[position] == 0x7F:
                    raise ProtocolViolation(f"a control character in an atom: {_show(line)}")
                position += 1
            atom = _text(line[start:position])
            yield _Token(None if atom.upper() == "NIL" else atom)


def _quoted(line: bytes, position: int) -> tuple[bytes, int]:
    """The quoted string starting after its opening quote; the position after its closing one."""
    out = bytearray()
    size = len(line)
    while position < size:
        char = line[position]
        if char == 0x22:
            return bytes(out), position + 1
        if char == 0x5C:  # backslash: only \\ and \" are allowed; be lenient with others
            position += 1
            if position >= size:
                break
            char = line[position]
        out.append(char)
        position += 1
    raise ProtocolViolation(f"an unterminated quoted string: {_show(line)}")


def _is_number(atom: str) -> bool:
    return atom.isascii() and atom.isdigit() and len(atom) <= 20


def _number(atom: str) -> int:
    if not _is_number(atom):
        raise ProtocolViolation(f"not a number: {atom[:40]!r}")
    return int(atom)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _show(raw: bytes) -> str:
    """A line for an error message: short, printable."""
    return repr(raw[:120].decode("utf-8", "replace"))


# -- reading values -------------------------------------------------------------------------------


def fetch_attributes(response: DataResponse) -> dict[str, Value]:
    """A FETCH response's attributes by upper-case name ("UID", "RFC822.SIZE", "BODY[]")."""
    if len(response.values) != 1 or not isinstance(response.values[0], tuple):
        raise ProtocolViolation("a FETCH response without its list of attributes")
    items = response.values[0]
    if len(items) % 2:
        raise ProtocolViolation("a FETCH response with an attribute without a value")
    attributes: dict[str, Value] = {}
    for index in range(0, len(items), 2):
        name = items[index]
        if not isinstance(name, str):
            raise ProtocolViolation("a FETCH attribute name that is not an atom")
        attributes[name.upper()] = items[index + 1]
    return attributes


def number_value(value: Value, what: str) -> int:
    """A numeric atom, or a `ProtocolViolation` naming `what` it should have been."""
    if not isinstance(value, str) or not _is_number(value):
        raise ProtocolViolation(f"{what} is not a number: {value!r:.60}")
    return int(value)


# -- command arguments ---------------------------------------------------------------------------


def quoted(value: bytes) -> bytes | None:
    """`value` as a quoted string, or None if it must be sent as a literal (8-bit, CR, LF, NUL)."""
    if any(char >= 0x80 or char in (0x00, 0x0A, 0x0D) for char in value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def sequence_set(numbers: Iterable[int]) -> bytes:
    """Numbers as an IMAP sequence set, runs folded: [1, 2, 3, 7] -> b"1:3,7"."""
    ordered = sorted(set(numbers))
    if not ordered:
        raise ValueError("an empty sequence set")
    runs: list[str] = []
    start = previous = ordered[0]
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        runs.append(str(start) if start == previous else f"{start}:{previous}")
        if number is not None:
            start = previous = number
    return ",".join(runs).encode("ascii")


# -- modified UTF-7 (RFC 3501 5.1.3) -------------------------------------------------------------


def encode_folder(name: str) -> str:
    """A folder name in modified UTF-7: "Entwürfe" -> "Entw&APw-rfe", "R&D" -> "R&-D"."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")  # UnicodeEncodeError for a lone surrogate
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


_SHIFTED = re.compile(r"&([A-Za-z0-9+,]*)-")


def decode_folder(name: str) -> str:
    """A modified UTF-7 folder name as text; ValueError if it is not well formed."""
    if any(not 0x20 <= ord(char) <= 0x7E for char in name):
        raise ValueError(f"not modified UTF-7 (8-bit or control characters): {name!r:.80}")
    out: list[str] = []
    position = 0
    for shifted in _SHIFTED.finditer(name):
        plain = name[position : shifted.start()]
        if "&" in plain:
            raise ValueError(f"an unterminated '&' in {name!r:.80}")
        out.append(plain)
        position = shifted.end()
        encoded = shifted.group(1)
        if not encoded:
            out.append("&")
            continue
        if len(encoded) % 4 == 1:
            raise ValueError(f"a broken base64 run in {name!r:.80}")
        try:
            raw = base64.b64decode(encoded.replace(",", "/") + "=" * (-len(encoded) % 4), validate=True)
            text = raw.decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError) as error:
            raise ValueError(f"a broken base64 run in {name!r:.80}: {error}") from error
        if any(0x20 <= ord(char) <= 0x7E for char in text):
            raise ValueError(f"printable ASCII encoded in base64 in {name!r:.80}")
        out.append(text)
    rest = name[position:]
    if "&" in rest:
        raise ValueError(f"an unterminated '&' in {name!r:.80}")
    out.append(rest)
    return "".join(out)
