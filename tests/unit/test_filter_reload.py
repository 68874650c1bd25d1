"""Reloading the filters of a process: SIGHUP, the control socket's reload, the workers."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import LogLevel, capturedLogs
from zope.interface import implementer

from gateway.config import ConfigError
from gateway.filters import Request
from gateway.filters._listfile import Kind
from gateway.filters.chain import ChainRunner, Link
from gateway.filters.lists import Lists
from gateway.filters.reload import ReloadFailed, SighupReload, install_sighup, reload_filters, reloader
from gateway.filters.testing import StaticFilter
from gateway.interfaces import IReloadable
from gateway.model import Action, Direction, Envelope, Session, Stage


@implementer(IReloadable)
class BrokenReload(StaticFilter):
    """A reloadable filter whose reload has a bug."""

    def reload(self) -> None:
        raise RuntimeError("boom")


def runner_of(*filters: Any) -> ChainRunner:
    links = tuple(Link(f) for f in filters)
    # the same instance in two chains is reloaded once
    return ChainRunner({Direction.INBOUND: links, Direction.OUTBOUND: links}, None)  # type: ignore[arg-type]


def sender_lists(path: Path) -> Lists:
    return Lists({}, {(Kind.SENDERS, False): (str(path),)})


def blocks(lists: Lists, sender: str) -> bool:
    request = Request(Stage.MAIL, Direction.INBOUND, Session("192.0.2.1"), Envelope(sender, ()))
    return lists.check(request).action is Action.REJECT


def test_reload_filters_reloads_each_reloadable_filter_once(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("@old.test\n")
    lists = sender_lists(path)
    path.write_text("@new.test\n")
    with capturedLogs() as events:
        result = reload_filters(runner_of(lists, StaticFilter("static")))
    assert result.reloaded == ("lists",) and result.failed == ()
    assert result.describe() == "reloaded lists"
    assert blocks(lists, "x@new.test")
    assert [e["log_level"] for e in events if e["log_level"] >= LogLevel.warn] == []


def test_a_bad_file_is_logged_once_with_file_and_line_and_the_old_lists_stay(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("@old.test\n")
    lists = sender_lists(path)
    path.write_text("# new\n@new.test\n@@@\n")
    with capturedLogs() as events:
        result = reload_filters(runner_of(lists))
    assert result.reloaded == ()
    [(name, error)] = result.failed
    assert name == "lists"
    assert error.startswith(f"{path}, line 3: '@@@' is not an address or a domain")
    errors = [e for e in events if e["log_level"] is LogLevel.error]
    assert len(errors) == 1
    assert f"{path}, line 3" in str(errors[0]["error"])
    assert blocks(lists, "x@old.test") and not blocks(lists, "x@new.test")
    assert result.describe().startswith(f"filter lists kept its old data: {path}, line 3:")


def test_a_filter_whose_reload_crashes_does_not_stop_the_others(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("")
    lists = sender_lists(path)
    path.write_text("@new.test\n")
    with capturedLogs():
        result = reload_filters(runner_of(BrokenReload("broken"), lists))
    assert result.reloaded == ("lists",)
    assert result.failed == (("broken", "RuntimeError: boom"),)
    assert blocks(lists, "x@new.test")


def test_nothing_to_reload_says_so() -> None:
    assert reload_filters(runner_of(StaticFilter("static"))).describe() == "no filter to reload"


class RecordingProcess:
    def __init__(self, exited: bool = False) -> None:
        self.signals: list[str] = []
        self.exited = exited

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


class Workers:
    def __init__(self, links: dict[int, RecordingProcess]) -> None:
        self.links = links


def test_main_process_reload_signals_the_workers(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("@a.test\n")
    workers = Workers({1: RecordingProcess(), 2: RecordingProcess(), 3: RecordingProcess(exited=True)})
    reload = reloader(runner_of(sender_lists(path)), workers)  # type: ignore[arg-type]
    with capturedLogs():
        assert reload() == "reloaded lists; SIGHUP sent to 2 SMTP worker process(es)"
    assert workers.links[1].signals == ["HUP"] and workers.links[2].signals == ["HUP"]


def test_reloader_raises_reload_failed_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("@a.test\n")
    reload = reloader(runner_of(sender_lists(path)))
    path.write_text("999.1.1.1 x\n")
    with capturedLogs(), pytest.raises(ReloadFailed) as raised:
        reload()
    assert f"{path}, line 1: one entry per line" in str(raised.value)
    assert isinstance(raised.value, ValueError)  # the control socket sends its text to mailgatectl


class ThreadCalls:
    """A reactor's callFromThread that only records (run them with `run`)."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, function: Callable[[], object]) -> None:
        self.calls.append(function)

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            call()


@pytest.fixture
def restore_sighup() -> Any:
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_sighup_schedules_a_reload_in_the_reactor_thread(tmp_path: Path, restore_sighup: Any) -> None:
    path = tmp_path / "block.txt"
    path.write_text("")
    lists = sender_lists(path)
    reactor = ThreadCalls()
    install_sighup(reactor, reloader(runner_of(lists)))
    path.write_text("@new.test\n")
    os.kill(os.getpid(), signal.SIGHUP)  # the handler runs at once, in this (the main) thread
    assert len(reactor.calls) == 1
    assert not blocks(lists, "x@new.test")  # nothing reloaded inside the signal handler
    with capturedLogs() as events:
        reactor.run()
    assert blocks(lists, "x@new.test")
    logged = [e.get("summary") for e in events if e.get("log_namespace") == "mailgate.reload"]
    assert logged == [None, "reloaded lists"]  # "SIGHUP received", then what it did


def test_a_failed_reload_on_sighup_is_logged_not_raised(tmp_path: Path, restore_sighup: Any) -> None:
    path = tmp_path / "block.txt"
    path.write_text("@old.test\n")
    lists = sender_lists(path)
    reactor = ThreadCalls()
    install_sighup(reactor, reloader(runner_of(lists)))
    path.write_text("bad entry\n")
    os.kill(os.getpid(), signal.SIGHUP)
    with capturedLogs() as events:
        reactor.run()  # does not raise
    assert [e["log_level"] for e in events if e["log_level"] >= LogLevel.warn] == [LogLevel.error]
    assert blocks(lists, "x@old.test")


def test_config_error_is_what_lists_reload_raises(tmp_path: Path) -> None:
    # IReloadable's contract, which reload_filters relies on
    path = tmp_path / "block.txt"
    path.write_text("")
    lists = sender_lists(path)
    path.write_text("x y\n")
    with pytest.raises(ConfigError):
        lists.reload()


def test_sighup_service_reloads_while_running_and_restores_the_old_handler(restore_sighup: Any) -> None:
    def before(signum: int, frame: object) -> None:
        raise AssertionError("the old handler must not run while the service runs")

    signal.signal(signal.SIGHUP, before)
    reactor = ThreadCalls()
    reloads: list[int] = []
    service = SighupReload(reactor, lambda: str(reloads.append(1)))
    service.startService()
    os.kill(os.getpid(), signal.SIGHUP)
    with capturedLogs():
        reactor.run()
    assert reloads == [1]
    service.stopService()
    assert signal.getsignal(signal.SIGHUP) is before
