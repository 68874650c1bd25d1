"""Reloading filters without a restart: SIGHUP and `mailgatectl reload`.

Filters that read files (the lists) provide `IReloadable`. A reload asks each
of them to re-read; one whose file is bad logs one error naming the file and
line, and keeps what it had. In the main process a reload also passes SIGHUP on
to the SMTP worker processes, which reload their own filters the same way.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger

from gateway.config import ConfigError
from gateway.filters.chain import ChainRunner
from gateway.interfaces import IReloadable

if TYPE_CHECKING:
    from gateway.smtp.workers import SmtpWorkers

log = Logger(namespace="mailgate.reload")


class ReloadFailed(ValueError):
    """A filter could not reload (its old data is kept); the message says which and why.

    A ValueError so that the control socket sends the message to mailgatectl.
    """


@attrs.frozen
class ReloadResult:
    """Which filters reloaded, and which kept their old data (with the error)."""

    reloaded: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (filter name, the one-line error)

    def describe(self) -> str:
        if not self.reloaded and not self.failed:
            return "no filter to reload"
        parts = []
        if self.reloaded:
            parts.append(f"reloaded {', '.join(self.reloaded)}")
        parts.extend(f"filter {name} kept its old data: {error}" for name, error in self.failed)
        return "; ".join(parts)


def reload_filters(runner: ChainRunner) -> ReloadResult:
    """Reload every reloadable filter of the runner's chains, logging each failure."""
    reloaded: list[str] = []
    failed: list[tuple[str, str]] = []
    for candidate in runner.all_filters():
        if not IReloadable.providedBy(candidate):
            continue
        name = str(getattr(candidate, "name", type(candidate).__name__))
        try:
            candidate.reload()
        except ConfigError as error:
            log.error("filter {name}: reload failed, the old data is kept: {error}", name=name, error=error)
            failed.append((name, str(error)))
        except Exception as error:  # a bug in a filter must not take the gateway down
            log.failure("filter {name}: reload failed, the old data is kept", name=name)
            failed.append((name, f"{type(error).__name__}: {error}"))
        else:
            reloaded.append(name)
    return ReloadResult(tuple(reloaded), tuple(failed))


def reloader(runner: ChainRunner, workers: SmtpWorkers | None = None) -> Callable[[], str]:
    """The reload of one process, as SIGHUP and the control socket run it.

    It reloads the runner's filters, passes SIGHUP on to the SMTP worker
    processes when `workers` is given (they reload on their own, a moment
    later), logs and returns a one-line summary; it raises `ReloadFailed` (with
    the same summary) when a filter kept its old data.
    """

    def reload() -> str:
        result = reload_filters(runner)
        summary = result.describe()
        if workers is not None:
            signalled = signal_workers(workers)
            summary += f"; SIGHUP sent to {signalled} SMTP worker process(es)"
        if result.failed:
            raise ReloadFailed(summary)  # each failure is logged already
        log.info("reload: {summary}", summary=summary)
        return summary

    return reload


def signal_workers(workers: SmtpWorkers) -> int:
    """Send SIGHUP to every running SMTP worker process; how many were sent one."""
    count = 0
    for transport in list(workers.links.values()):
        try:
            transport.signalProcess("HUP")
        except (ProcessExitedAlready, OSError) as error:  # it is being restarted (and reads anew)
            log.debug("SIGHUP not sent to a worker: {error}", error=error)
        else:
            count += 1
    return count


def install_sighup(reactor: Any, reload: Callable[[], object]) -> Any:
    """Run `reload` in the reactor thread whenever the process gets SIGHUP.

    The handler only schedules the reload (callFromThread is safe from a signal
    handler); errors are logged by the reload, never raised into the reactor.
    Returns the handler that was there before.
    """

    def run() -> None:
        log.info("SIGHUP received: reloading")
        with contextlib.suppress(ReloadFailed):  # logged, filter by filter, by reload_filters
            reload()

    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(run)

    return signal.signal(signal.SIGHUP, handler)


class SighupReload(Service):
    """Reloads on SIGHUP while the gateway runs (the handler goes when it stops)."""

    def __init__(self, reactor: Any, reload: Callable[[], object]) -> None:
        self.reactor = reactor
        self.reload = reload
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._previous = install_sighup(self.reactor, self.reload)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
