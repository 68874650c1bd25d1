"""A non-blocking client for spamd, SpamAssassin's daemon, in its SPAMC/1.5 protocol.

One request per connection, as spamc does::

    SYMBOLS SPAMC/1.5\\r\\n
    Content-length: 156\\r\\n
    User: alice\\r\\n                       (optional: whose preferences spamd uses)
    \\r\\n
    <the message>

and spamd answers ``SPAMD/1.1 0 EX_OK``, header lines (``Spam: True ; 1002.7 / 5.0``,
``Content-length: 68``), a blank line and, for SYMBOLS and REPORT, a body: the
names of the rules that hit (``GTUBE,MISSING_DATE``) or the report text. CHECK
gives the verdict alone. TELL trains SpamAssassin (spamd must run with
--allow-tell): ``Message-class: spam|ham`` and ``Set: local`` (or ``Remove: local``),
answered with ``DidSet: local`` (nothing when the message was learnt before).
A status other than 0 (``SPAMD/1.0 76 Bad header line: ...``) is an error.

The message is sent as it is (no compression), so keep it small: the filter sends
none larger than its `max_size`, as spamc does.
"""

from __future__ import annotations

import re

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from gateway.scanners import ScannerProtocolError
from gateway.scanners._connection import ExchangeProtocol, ScannerConnections

__all__ = ["SpamdClient", "SpamdProtocol", "SpamdResult", "TellResult"]

COMMANDS = ("CHECK", "SYMBOLS", "REPORT")
MAX_REPLY = 1024 * 1024  # a REPORT is a few KB; anything near this is not spamd
_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) +(\d+) +(.*)$")
_SPAM = re.compile(r"^(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)$", re.IGNORECASE)
_USER = re.compile(r"^[^\s:]{1,128}$")


@attrs.frozen
class SpamdResult:
    """What spamd said about a message."""

    spam: bool  # spamd's own opinion: score >= its required score
    score: float
    threshold: float  # spamd's required score (its configuration, not ours)
    symbols: tuple[str, ...] = ()  # the rules that hit (SYMBOLS)
    report: str = ""  # the report text (REPORT)


@attrs.frozen
class TellResult:
    """What a TELL changed: the databases spamd says it set or removed the message in."""

    did_set: tuple[str, ...] = ()
    did_remove: tuple[str, ...] = ()


@attrs.frozen
class _Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for field, value in self.headers if field.lower() == wanted), None)


class SpamdProtocol(ExchangeProtocol[_Reply]):
    """One SPAMC request and spamd's answer, read as it comes (bounded by `max_reply`).

    `status_only`: the answer is the status line alone (PING's ``SPAMD/1.5 0 PONG``).
    """

    scanner = "spamd"

    def __init__(self, request: bytes, max_reply: int = MAX_REPLY, *, status_only: bool = False) -> None:
        super().__init__(max_reply)
        self.request = request
        self.status_only = status_only

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def parse(self, reply: bytes, complete: bool) -> _Reply | None:
        line_end = reply.find(b"\r\n")
        status_line = reply[:line_end] if line_end >= 0 else (reply if complete else b"")
        if not status_line:
            return None
        match = _STATUS.match(status_line)
        if match is None:
            raise ScannerProtocolError(f"spamd answered {_shown(status_line)!r}, not a SPAMD status line")
        status = int(match.group(2))
        if status != 0:
            # spamd says why and closes; no headers follow an error
            raise ScannerProtocolError(f"spamd refused the request: {_shown(status_line)}")
        if self.status_only:
            return _Reply(status, (), b"")
        head_end = reply.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        headers = []
        block = reply[line_end + 2 : head_end] if head_end > line_end else b""
        for line in block.split(b"\r\n") if block else ():
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise ScannerProtocolError(f"spamd sent a malformed header line {_shown(line)!r}")
            headers.append((name.strip(), value.strip()))
        body = reply[head_end + 4 :]
        result = _Reply(status, tuple(headers), b"")
        length = result.header("Content-length")
        if length is None:
            return result  # CHECK and TELL: no body (spamd may add a stray blank line)
        if not length.isdigit():
            raise ScannerProtocolError(f"spamd sent Content-length {length!r}")
        if len(body) < int(length):
            return None
        return attrs.evolve(result, body=body[: int(length)])


class SpamdClient:
    """Asks spamd at one endpoint: check / symbols / report a message, tell it spam or ham."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        address: str = "",
        max_connections: int = 5,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        user: str | None = None,
    ) -> None:
        """`user`: the User header sent with every request (whose preferences spamd uses)."""
        if user is not None:
            _check_user(user)
        self.user = user
        self.connections = ScannerConnections(
            "spamd",
            endpoint,
            clock,
            address=address,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            timeout=timeout,
        )

    def check(self, message: bytes, command: str = "SYMBOLS") -> Deferred[SpamdResult]:
        """spamd's verdict on `message` (raw bytes); SYMBOLS adds the rule names, REPORT the report."""
        if command not in COMMANDS:
            raise ValueError(f"spamd command must be one of {', '.join(COMMANDS)}, not {command!r}")
        answer = self._ask(command, message)
        return answer.addCallback(_result, command)

    def symbols(self, message: bytes) -> Deferred[SpamdResult]:
        return self.check(message, "SYMBOLS")

    def report(self, message: bytes) -> Deferred[SpamdResult]:
        return self.check(message, "REPORT")

    def tell(self, message: bytes, kind: str, *, remove: bool = False) -> Deferred[TellResult]:
        """Train SpamAssassin's local database (Bayes): `kind` "spam" or "ham"; `remove` forgets."""
        if kind not in ("spam", "ham"):
            raise ValueError(f"a message is told as spam or ham, not {kind!r}")
        extra = [("Message-class", kind), ("Remove" if remove else "Set", "local")]
        answer = self._ask("TELL", message, extra)
        return answer.addCallback(_told)

    def ping(self) -> Deferred[str]:
        """spamd's PONG line ("SPAMD/1.5 0 PONG"), for health checks."""
        ping = SpamdProtocol(b"PING SPAMC/1.5\r\n\r\n", status_only=True)
        answer: Deferred[_Reply] = self.connections.exchange(ping)
        return answer.addCallback(lambda _reply: "PONG")

    def _ask(
        self, command: str, message: bytes, extra: list[tuple[str, str]] | None = None
    ) -> Deferred[_Reply]:
        return self.connections.exchange(SpamdProtocol(request(command, message, self.user, extra)))


def request(
    command: str, message: bytes, user: str | None = None, extra: list[tuple[str, str]] | None = None
) -> bytes:
    """The bytes of one SPAMC/1.5 request."""
    lines = [f"{command} SPAMC/1.5", f"Content-length: {len(message)}"]
    if user is not None:
        lines.append(f"User: {user}")
    lines.extend(f"{name}: {value}" for name, value in extra or ())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + message


def _result(reply: _Reply, command: str) -> SpamdResult:
    verdict = reply.header("Spam")
    if verdict is None:
        raise ScannerProtocolError(f"spamd answered {command} without a Spam: header")
    match = _SPAM.match(verdict)
    if match is None:
        raise ScannerProtocolError(f"spamd sent an unreadable Spam: header {verdict!r}")
    text = reply.body.decode("utf-8", "replace")
    symbols: tuple[str, ...] = ()
    report = ""
    if command == "SYMBOLS":
        symbols = tuple(name.strip() for name in text.split(",") if name.strip())
    elif command == "REPORT":
        report = text
    return SpamdResult(
        spam=match.group(1).lower() in ("true", "yes"),
        score=float(match.group(2)),
        threshold=float(match.group(3)),
        symbols=symbols,
        report=report,
    )


def _told(reply: _Reply) -> TellResult:
    def databases(name: str) -> tuple[str, ...]:
        value = reply.header(name) or ""
        return tuple(part.strip() for part in value.split(",") if part.strip())

    return TellResult(did_set=databases("DidSet"), did_remove=databases("DidRemove"))


def _check_user(user: str) -> None:
    if not _USER.match(user):
        raise ValueError(f"spamd user {user!r} must be one word without spaces or colons")


def _shown(raw: bytes, limit: int = 200) -> str:
    """Part of a line from the daemon, safe to log."""
    text = raw[:limit].decode("latin-1")
    return "".join(c if c.isprintable() else "?" for c in text)
