"""MessageContent and ContentReader: one parse per message, shared, off the reactor thread."""

from __future__ import annotations

import io
import queue
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from gateway.config import ConfigError, Section
from gateway.content import ContentLimits, ContentReader, MessageContent, ParsedMessage
from gateway.content.parse import parse_message

MESSAGE = b"Subject: hello\r\nContent-Type: text/plain\r\n\r\nbody text\r\n"


def results(deferred: Deferred[ParsedMessage]) -> list[ParsedMessage | Failure]:
    seen: list[ParsedMessage | Failure] = []
    deferred.addBoth(seen.append)
    return seen


class CountingParse:
    """A parse that the test finishes: counts its calls, answers when told."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.pending: Deferred[ParsedMessage] = Deferred()

    def __call__(self, raw: bytes) -> Deferred[ParsedMessage]:
        self.calls.append(raw)
        return self.pending


def content(parse: Callable[[bytes], Any], data: bytes = MESSAGE) -> MessageContent:
    return MessageContent(len(data), lambda: io.BytesIO(data), parse)


def test_from_bytes_parses_in_the_callers_thread() -> None:
    [parsed] = results(MessageContent.from_bytes(MESSAGE).parsed())
    assert isinstance(parsed, ParsedMessage)
    assert (parsed.subject, parsed.text) == ("hello", "body text")


def test_two_filters_share_one_parse() -> None:
    parse = CountingParse()
    message = content(parse)
    first, second = results(message.parsed()), results(message.parsed())
    assert (first, second) == ([], [])
    parsed = parse_message(MESSAGE)
    parse.pending.callback(parsed)
    third = results(message.parsed())
    assert first == second == third == [parsed]
    assert first[0] is second[0] is third[0]
    assert parse.calls == [MESSAGE]


def test_a_failed_parse_fails_every_caller() -> None:
    parse = CountingParse()
    message = content(parse)
    first, second = results(message.parsed()), results(message.parsed())
    parse.pending.errback(RuntimeError("parser broke"))
    later = results(message.parsed())
    for seen in (first, second, later):
        [failure] = seen
        assert isinstance(failure, Failure)
        assert isinstance(failure.value, RuntimeError)
    assert len(parse.calls) == 1


def test_a_parse_that_raises_fails_the_callers_not_the_reactor() -> None:
    def broken(raw: bytes) -> ParsedMessage:
        raise ValueError("no")

    [failure] = results(content(broken).parsed())
    assert isinstance(failure, Failure) and isinstance(failure.value, ValueError)
    [failure] = results(content(lambda raw: fail(KeyError("x"))).parsed())
    assert isinstance(failure, Failure) and isinstance(failure.value, KeyError)


def test_message_larger_than_max_bytes_is_parsed_in_part_and_says_so() -> None:
    data = MESSAGE + b"more text\r\n" * 500
    limits = ContentLimits(max_bytes=1024)
    seen: list[bytes] = []

    def parse(raw: bytes) -> ParsedMessage:
        seen.append(raw)
        return parse_message(raw, limits)

    message = MessageContent(len(data), lambda: io.BytesIO(data), parse, limits)
    [parsed] = results(message.parsed())
    assert seen == [data[:1024]]
    assert isinstance(parsed, ParsedMessage)
    assert parsed.truncated
    assert parsed.size == len(data)
    assert parsed.defects == ("larger than 1024 bytes: the rest not read",)
    assert parsed.text.startswith("body text\nmore text")


def test_message_within_max_bytes_is_not_truncated() -> None:
    [parsed] = results(MessageContent.from_bytes(MESSAGE, ContentLimits(max_bytes=len(MESSAGE))).parsed())
    assert isinstance(parsed, ParsedMessage)
    assert not parsed.truncated


class ThreadedReactor:
    """Just what deferToThreadPool needs: calls from the pool's threads are queued for the test."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self.triggers: list[Callable[[], Any]] = []

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        self.calls.put((function, args))

    def addSystemEventTrigger(self, phase: str, event: str, function: Callable[[], Any]) -> None:
        assert (phase, event) == ("during", "shutdown")
        self.triggers.append(function)

    def run_one(self) -> None:
        """Runs the next call a pool thread handed back (waiting for the thread, not sleeping)."""
        function, args = self.calls.get(timeout=30)
        function(*args)

    def shutdown(self) -> None:
        for trigger in self.triggers:
            trigger()


def test_reader_parses_in_its_pool_and_stops_with_the_reactor() -> None:
    reactor = ThreadedReactor()
    reader = ContentReader(reactor, ContentLimits(threads=1))
    try:
        message = reader.content(len(MESSAGE), lambda: io.BytesIO(MESSAGE))
        first, second = results(message.parsed()), results(message.parsed())
        assert (first, second) == ([], [])  # the parse runs in the pool, not in this call
        reactor.run_one()
        assert first == second == [parse_message(MESSAGE)]
    finally:
        reactor.shutdown()
    assert len(reactor.triggers) == 1


def section(text: str) -> Section:
    return Section("mailgate.toml", text, tomllib.loads(text).get("content", {}), "content")


def test_limits_from_the_config() -> None:
    limits = ContentLimits.from_section(
        section(
            '[content]\nmax_bytes = "10M"\nmax_parts = 50\nmax_depth = 8\nmax_text = "512K"\nthreads = 4\n'
        )
    )
    assert limits == ContentLimits(10 * 1024 * 1024, 50, 8, 512 * 1024, 4)


def test_limits_default_to_the_documented_values() -> None:
    assert ContentLimits.from_section(section("")) == ContentLimits()
    assert ContentLimits() == ContentLimits(50 * 1024 * 1024, 1000, 20, 1024 * 1024, 2)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("max_bytes = 100", "content.max_bytes: must be at least 1024 (1K), not 100"),
        ("max_bytes = 'lots'", "content.max_bytes: must be a size like"),
        ("max_parts = 0", "content.max_parts: must be at least 1, not 0"),
        ("max_depth = -1", "content.max_depth: must be at least 1, not -1"),
        ("max_text = 0", "content.max_text: must be at least 1"),
        ("threads = 100", "content.threads: must be at most 64, not 100"),
        ("max_part = 5", "content.max_part: unknown key"),
    ],
)
def test_bad_limits_are_refused(setting: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ContentLimits.from_section(section(f"[content]\n{setting}\n"))
    assert problem in str(raised.value)


def test_snippet_documents_every_key_at_its_default() -> None:
    # The [content] snippet given to etc/mailgate.toml: uncommented, it is the defaults.
    snippet = """
[content]
max_bytes = "50M"
max_parts = 1000
max_depth = 20
max_text = "1M"
threads = 2
"""
    assert ContentLimits.from_section(section(snippet)) == ContentLimits()
