"""An SMTP worker's log lines: written to stderr once per reactor turn, warnings at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python import threadable

from gateway.smtp.workers import StderrLog


class Out:
    """A stderr that records each write (a flush is a no-op)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def in_io_thread() -> Iterator[None]:
    """This thread as the reactor's, as it is in a running worker."""
    before = threadable.ioThread
    threadable.registerAsIOThread()  # type: ignore[no-untyped-call]
    yield
    threadable.ioThread = before


def logger(out: Out, clock: Clock) -> tuple[Logger, StderrLog]:
    observer = StderrLog(clock, out)
    return Logger(namespace="mailgate.smtpd", observer=observer), observer  # type: ignore[arg-type]


def test_the_lines_of_one_turn_go_out_in_one_write_after_it(in_io_thread: None) -> None:
    out, clock = Out(), Clock()
    log, _ = logger(out, clock)
    log.info("smtpd: connect from [{peer}]", peer="192.0.2.1")
    log.info("smtpd: disconnect from [{peer}]", peer="192.0.2.2")
    assert out.writes == []  # not yet: the turn goes on
    clock.advance(0)
    assert out.writes == ["info smtpd: connect from [192.0.2.1]\ninfo smtpd: disconnect from [192.0.2.2]\n"]
    clock.advance(0)
    assert len(out.writes) == 1  # nothing more, and no second write


def test_a_warning_goes_out_at_once_after_what_waited(in_io_thread: None) -> None:
    out, clock = Out(), Clock()
    log, _ = logger(out, clock)
    log.info("first")
    log.warn("second")
    assert out.writes == ["info first\nwarn second\n"]
    assert clock.getDelayedCalls() == []  # the end-of-turn write was called off
    log.error("third")
    assert out.writes[-1] == "error third\n"


def test_a_traceback_comes_with_its_line_each_line_tagged(in_io_thread: None) -> None:
    out, clock = Out(), Clock()
    log, _ = logger(out, clock)
    try:
        raise ValueError("broken")
    except ValueError:
        log.failure("smtpd: it broke")
    text = "".join(out.writes)
    assert text.startswith("critical smtpd: it broke\ncritical Traceback")
    assert "critical builtins.ValueError: broken\n" in text
    assert all(line.startswith("critical ") for line in text.splitlines())


def test_flush_writes_what_waits_at_shutdown(in_io_thread: None) -> None:
    out, clock = Out(), Clock()
    log, observer = logger(out, clock)
    log.info("last words")
    observer.flush()
    assert out.writes == ["info last words\n"]
    assert clock.getDelayedCalls() == []
    observer.flush()
    assert len(out.writes) == 1


def test_a_line_from_another_thread_goes_out_at_once(in_io_thread: None) -> None:
    # callLater is not safe from a thread pool (AUTH hashing logs there)
    out, clock = Out(), Clock()
    log, _ = logger(out, clock)
    thread = threading.Thread(target=lambda: log.info("from a pool"))
    thread.start()
    thread.join()
    assert out.writes == ["info from a pool\n"]
    assert clock.getDelayedCalls() == []


def test_the_main_process_logs_each_worker_line_at_its_level_as_written() -> None:
    from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText

    from gateway.smtp.workers import WorkerLink

    events: list[dict[str, object]] = []
    link = WorkerLink(None, 2)  # type: ignore[arg-type]  # the pool is not needed for log lines
    link.log.observer = events.append  # type: ignore[assignment]
    link.errReceived(b"info smtpd: connect from [192.0.2.1]:4000 {braces} {0} %s\nwarn filter: slow\nerr")
    link.errReceived(b"or dns: no answer\nTraceback (most recent call last):\n")
    assert [formatEvent(event) for event in events] == [
        "smtpd: connect from [192.0.2.1]:4000 {braces} {0} %s",  # as written, no field looked up
        "filter: slow",
        "dns: no answer",  # a line that came in two reads
        "Traceback (most recent call last):",  # not the worker's log (a crash): kept whole
    ]
    assert [event["log_level"] for event in events] == [
        LogLevel.info,
        LogLevel.warn,
        LogLevel.error,
        LogLevel.warn,
    ]
    assert {event["log_namespace"] for event in events} == {"mailgate.smtpd.2"}
    # what the main process's text log shows, as for any event of its own
    line = formatEventAsClassicLogText(events[1])
    assert line is not None and line.endswith(" [mailgate.smtpd.2#warn] filter: slow\n")
