"""Reading the message: one parse per message, shared by every content filter.

At the end of DATA the reception hands the DATA-stage filters a `MessageContent`
(``request.message``): the raw bytes as received (our Received header first), and
`parsed()`, a `ParsedMessage` made once and shared by everything that asks. The
parse itself is `gateway.content.parse.parse_message`, a pure function bounded by
`ContentLimits`; `ContentReader` runs it off the reactor thread, in a small pool
of its own.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed

if TYPE_CHECKING:
    from gateway.config import Section

__all__ = ["Attachment", "ContentLimits", "ContentReader", "MessageContent", "ParsedMessage"]


@attrs.frozen
class ContentLimits:
    """How much of a hostile message the parse will look at ([content] in the config)."""

    max_bytes: int = 50 * 1024 * 1024  # raw bytes parsed; the rest is not looked at (truncated)
    max_parts: int = 1000  # MIME parts
    max_depth: int = 20  # MIME nesting (multipart in multipart, message/rfc822 in ...)
    max_text: int = 1024 * 1024  # characters of decoded text kept for the filters
    threads: int = 2  # parses running at once, off the reactor thread

    @classmethod
    def from_section(cls, section: Section) -> ContentLimits:
        """The ``[content]`` table, every key checked (an unknown key is an error)."""
        default = cls()
        max_bytes = section.size("max_bytes", default.max_bytes)
        if max_bytes < 1024:
            raise section.error("max_bytes", f"must be at least 1024 (1K), not {max_bytes}")
        max_parts = section.positive("max_parts", default.max_parts)
        max_depth = section.positive("max_depth", default.max_depth)
        max_text = section.size("max_text", default.max_text)
        if max_text < 1:
            raise section.error("max_text", "must be at least 1")
        threads = section.positive("threads", default.threads)
        if threads > 64:
            raise section.error("threads", f"must be at most 64, not {threads}")
        section.done()
        return cls(max_bytes, max_parts, max_depth, max_text, threads)


@attrs.frozen
class Attachment:
    """A leaf MIME part that is not the message's text: a file, as its recipient would see it."""

    filename: str | None  # decoded (RFC 2231, encoded words); None when the part has no name
    content_type: str  # as declared, lower case ("application/octet-stream")
    payload: bytes  # the decoded content (base64 / quoted-printable undone)
    depth: int = 0  # MIME nesting depth of the part (0: the message itself)
    defects: tuple[str, ...] = ()  # what was wrong with this part (broken base64, ...)
    disposition: str = ""  # "attachment", "inline", or "" when the part did not say
    detected_type: str | None = None  # what the first bytes are ("application/zip"); None: not known

    @property
    def size(self) -> int:
        return len(self.payload)


@attrs.frozen
class ParsedMessage:
    """What the content filters read: headers, text and attachments, all decoded."""

    headers: tuple[tuple[str, str], ...]  # (name, decoded value) in order, top-level header only
    text: str  # the text parts (and text taken from HTML), decoded to str, joined; bounded
    attachments: tuple[Attachment, ...] = ()
    defects: tuple[str, ...] = ()  # what was malformed; the parse went as far as it could
    size: int = 0  # raw size in bytes
    truncated: bool = False  # a limit stopped the parse: the filters did not see everything
    html: bool = False  # some of the text was taken from HTML
    parts: int = 0  # MIME entities read (the message itself counts one)

    def header(self, name: str) -> list[str]:
        """Every value of a header field (case-insensitive name), decoded."""
        wanted = name.lower()
        return [value for field, value in self.headers if field.lower() == wanted]

    @property
    def subject(self) -> str:
        values = self.header("Subject")
        return values[0] if values else ""


class MessageContent:
    """The message at the end of DATA, for the DATA-stage filters: raw bytes and one shared parse."""

    def __init__(
        self,
        size: int,
        opener: Callable[[], IO[bytes]],
        parse: Callable[[bytes], Deferred[ParsedMessage] | ParsedMessage],
        limits: ContentLimits = ContentLimits(),
    ) -> None:
        self.size = size
        self.limits = limits
        self._opener = opener
        self._parse = parse
        self._parsed: Deferred[ParsedMessage] | None = None
        self._waiting: list[Deferred[ParsedMessage]] = []
        self._result: Any = None
        self._read = 0  # bytes handed to the parse

    @classmethod
    def from_bytes(cls, data: bytes, limits: ContentLimits = ContentLimits()) -> MessageContent:
        """For tests and for messages already in memory: parsed in the caller's thread."""
        from gateway.content.parse import parse_message

        return cls(len(data), lambda: io.BytesIO(data), lambda raw: parse_message(raw, limits), limits)

    def open(self) -> IO[bytes]:
        """The raw message from its first byte (a new file object each call; close it)."""
        return self._opener()

    def read(self, limit: int | None = None) -> bytes:
        """The raw message, or its first `limit` bytes."""
        with self.open() as stream:
            return stream.read() if limit is None else stream.read(limit)

    @property
    def done(self) -> ParsedMessage | None:
        """The parse, if some filter asked for it and it is over (for the log); else None."""
        return self._result if isinstance(self._result, ParsedMessage) else None

    def parsed(self) -> Deferred[ParsedMessage]:
        """The parse, made once; every caller gets its own Deferred of the same ParsedMessage."""
        mine: Deferred[ParsedMessage] = Deferred()
        if self._parsed is None:
            self._waiting.append(mine)
            raw = self.read(self.limits.max_bytes)
            self._read = len(raw)
            self._parsed = self._start(raw)
            self._parsed.addCallback(self._whole)
            self._parsed.addBoth(self._done)
        elif self._waiting:
            self._waiting.append(mine)
        else:
            self._give(mine)
        return mine

    def _start(self, raw: bytes) -> Deferred[ParsedMessage]:
        try:
            result = self._parse(raw)
        except Exception:
            return fail()
        return result if isinstance(result, Deferred) else succeed(result)

    def _whole(self, parsed: ParsedMessage) -> ParsedMessage:
        """The parse of the first max_bytes, saying that the message was larger."""
        if self.size <= self._read:
            return parsed
        return attrs.evolve(
            parsed,
            size=self.size,
            truncated=True,
            defects=(*parsed.defects, f"larger than {self.limits.max_bytes} bytes: the rest not read"),
        )

    def _done(self, result: Any) -> None:
        self._result = result
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            self._give(deferred)

    def _give(self, deferred: Deferred[ParsedMessage]) -> None:
        from twisted.python.failure import Failure

        if isinstance(self._result, Failure):
            deferred.errback(self._result)
        else:
            deferred.callback(self._result)


class ContentReader:
    """Makes the `MessageContent` of each message, parsing in a bounded pool off the reactor."""

    def __init__(
        self, reactor: Any, limits: ContentLimits = ContentLimits(), threads: int | None = None
    ) -> None:
        self.reactor = reactor
        self.limits = limits
        self._threads = limits.threads if threads is None else threads
        self._pool: Any = None

    def _run(self, raw: bytes) -> Deferred[ParsedMessage]:
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        from gateway.content.parse import parse_message

        if self._pool is None:
            self._pool = ThreadPool(1, self._threads, name="mailgate-content")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        result: Deferred[ParsedMessage] = deferToThreadPool(
            self.reactor, self._pool, parse_message, raw, self.limits
        )
        return result

    def content(self, size: int, opener: Callable[[], IO[bytes]]) -> MessageContent:
        return MessageContent(size, opener, self._run, self.limits)
