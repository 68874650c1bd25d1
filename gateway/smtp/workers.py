"""SMTP worker processes: the listeners served by several processes, as Postfix does.

One Python process runs one core. The main process binds the listening sockets
(as root, before it drops privileges), stops accepting on them, and hands them
to `smtp.workers` worker processes (``python -m gateway.smtp.workers``). Each
worker runs the SMTP server and commits what it receives into the shared spool
with a queue-id tag of its own; after each commit it writes the queue id on its
stdout, and the main process's queue manager delivers it. A worker's log lines
come to the main process on stderr and go into its log. Its filters' DNS
questions go to the main process on a socket pair of their own
(`gateway.filters._dnsrelay`), which asks them for all workers. A worker stops when its
stdin closes, so a main process that dies (even by kill -9) takes its workers
with it; a worker that dies is started again.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from gateway.filters._dnsrelay import LineChannel, main_end, worker_end
from gateway.filters.dns import Lookups

log = Logger(namespace="mailgate.workers")

RESTART_DELAY = 1.0
COUNTERS_EVERY = 5.0  # seconds between a worker's filter-counter reports to the main process


class WorkerLink(ProcessProtocol):
    """The main process's end of one worker: queue ids in, log lines in."""

    def __init__(self, pool: SmtpWorkers, index: int, dns: LineChannel | None = None) -> None:
        self.pool = pool
        self.index = index
        self._out = b""
        self._err = b""
        self.log = Logger(namespace=f"mailgate.smtpd.{index}")
        self.dns = dns  # the main end of the worker's DNS relay

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            if line.startswith(b"{"):  # the worker's filter counters
                try:
                    self.pool.filter_counters[self.index] = json.loads(line)
                except ValueError:
                    self.log.warn("worker {index}: unreadable counters line", index=self.index)
            elif line.startswith(b"ETRN "):  # an internal server asked a worker
                if self.pool.on_etrn is not None:
                    self.pool.on_etrn(line[5:].decode("ascii", "replace"))
            elif line:
                self.pool.on_queued(line.decode("ascii", "replace"))

    def errReceived(self, data: bytes) -> None:
        """The worker's log lines: one event each, as `Logger.emit` makes it, without its costs.

        Two lines come for every session, and the main process's CPU is the
        other processes' on a small machine: the event is made here (emit
        checks the level against every level each time) and the line, its
        braces doubled, is its format (no field to look up when it is written).
        """
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        logger = self.log
        observer = logger.observer
        namespace = logger.namespace
        for line in lines:
            whole = line.decode("utf-8", "replace")
            name, _, text = whole.partition(" ")
            level = _LEVELS.get(name)
            if level is None:  # not the worker's log: the interpreter's own (a crash), kept whole
                level, text = LogLevel.warn, whole
            observer(
                {
                    "log_logger": logger,
                    "log_level": level,
                    "log_namespace": namespace,
                    "log_source": None,
                    "log_format": text.replace("{", "{{").replace("}", "}}"),
                    "log_time": time.time(),
                }
            )

    def processEnded(self, reason: Failure) -> None:
        if self.dns is not None:
            self.dns.close()
        self.pool.ended(self, reason)


_LEVELS = {level.name: level for level in LogLevel.iterconstants()}  # the worker writes their names


class SmtpWorkers(Service):
    """Starts, watches and restarts the SMTP worker processes."""

    def __init__(
        self,
        count: int,
        config_path: str | None,
        endpoints: list[str],
        on_queued: Callable[[str], None],
        reactor: Any,
        on_etrn: Callable[[str], None] | None = None,
        dns: Callable[[], Lookups] | None = None,
    ) -> None:
        self.on_etrn = on_etrn  # a worker passed on an ETRN <domain>
        self.dns = dns  # what asks the workers' DNS questions (built on first use); None: they ask themselves
        self.count = count
        self.config_path = config_path
        self.endpoints = endpoints
        self.ports: list[tuple[IListeningPort, str]] = []  # bound by the main process
        self.on_queued = on_queued
        self.reactor = reactor
        self.links: dict[int, Any] = {}  # index -> IProcessTransport
        self.filter_counters: dict[int, dict[str, Any]] = {}  # index -> its last report
        self.drop_privileges = False  # set by the gateway when it will drop them itself

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._bind_and_spawn()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self.ports:  # a runner that has no privileged start (`python -m twisted`)
            self._bind_and_spawn()

    def _bind_and_spawn(self) -> None:
        for endpoint in self.endpoints:
            bound: list[IListeningPort] = []
            failed: list[Failure] = []
            server = serverFromString(self.reactor, endpoint)  # type: ignore[no-untyped-call]
            server.listen(Factory()).addCallbacks(bound.append, failed.append)
            if failed:
                failed[0].raiseException()  # a port in use stops start-up with a clear error
            bound[0].stopReading()  # type: ignore[attr-defined]  # the workers accept; the main process only holds the socket
            self.ports.append((bound[0], endpoint))
        for index in range(1, self.count + 1):
            self._spawn(index)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        for transport in list(self.links.values()):
            transport.closeStdin()  # the worker finishes its sessions' commits and exits
        for port, _endpoint in self.ports:
            port.stopListening()
        self.ports = []

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        fds = []
        for number, (port, endpoint) in enumerate(self.ports):
            fd = 3 + number
            child_fds[fd] = port.fileno()  # type: ignore[attr-defined]
            family = "6" if isinstance(port.getHost(), IPv6Address) else "4"
            fds.append(f"{fd}:{family}:{endpoint}")
        argv = [sys.executable, "-m", "gateway.smtp.workers", "--index", str(index)]
        if self.drop_privileges:
            argv.append("--drop-privileges")
        if self.config_path:
            argv += ["--config", self.config_path]
        for spec in fds:
            argv += ["--listener", spec]
        ours = theirs = None
        if self.dns is not None:
            ours, theirs = socket.socketpair()
            fd = 3 + len(self.ports)
            child_fds[fd] = theirs.fileno()
            argv += ["--dns-fd", str(fd)]
        link = WorkerLink(self, index)
        try:
            self.links[index] = self.reactor.spawnProcess(
                link, sys.executable, argv, env=dict(os.environ), path=os.getcwd(), childFDs=child_fds
            )
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()  # the worker has its own copy
        if ours is not None:
            _relay, link.dns = main_end(ours, self.reactor, self.dns)  # type: ignore[arg-type]
        log.info("smtpd worker {index} started (pid {pid})", index=index, pid=self.links[index].pid)

    def ended(self, link: WorkerLink, reason: Failure) -> None:
        self.links.pop(link.index, None)
        if not self.running:
            return
        log.error(
            "smtpd worker {index} ended ({reason}); starting it again",
            index=link.index,
            reason=reason.getErrorMessage(),
        )
        self.reactor.callLater(RESTART_DELAY, self._restart, link.index)

    def _restart(self, index: int) -> None:
        if not self.running or index in self.links:
            return
        try:
            self._spawn(index)
        except OSError as error:
            # started as root, we are no longer: the interpreter may be out of our reach
            log.error(
                "cannot start smtpd worker {index} again: {error}; the other workers go on, "
                "restart the gateway to get it back",
                index=index,
                error=error,
            )


class _ParentLink(Protocol):
    """The worker's stdin/stdout: queue ids out; end of stdin means stop."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.reactor.running:
            self.reactor.stop()


def _log_lines(event: dict[str, Any]) -> str:
    """An event as the worker sends it to the main process: "<level> <text>" lines."""
    from twisted.logger import formatEvent

    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    level = event.get("log_level", LogLevel.info).name
    return "".join(f"{level} {line}\n" for line in text.splitlines() or [""])


class StderrLog:
    """The worker's log observer: lines to stderr, where the main process reads and logs them.

    Lines logged in one turn of the reactor go out in one write just after it
    (a ``callLater(0)``), not one write each: a session logs two lines, and each
    write woke the main process, which on two vCPUs then often took the
    worker's (measured: the worker waited for a CPU 7 % of the time in the
    filter benchmark's chain cell). A warning or worse is written at once,
    with whatever waited before it, and so is a line logged outside the
    reactor's thread; `flush` writes what waits (at shutdown and exit).
    """

    def __init__(self, reactor: Any, out: Any = None) -> None:
        self.reactor = reactor
        self.out = out if out is not None else sys.stderr
        self.pending: list[str] = []
        self._flush: Any = None  # the callLater that writes at the end of this turn

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.python.threadable import isInIOThread

        lines = _log_lines(event)
        if not isInIOThread():  # type: ignore[no-untyped-call]
            # a thread pool's line: written now, without touching the reactor's
            # buffer or its timer (neither is safe from another thread)
            self.out.write(lines)
            self.out.flush()
            return
        self.pending.append(lines)
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            self.flush()
        elif self._flush is None:
            self._flush = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None
        if self.pending:
            text = "".join(self.pending)
            self.pending.clear()
            self.out.write(text)
            self.out.flush()


def _report_counters(parent: Any, runner: Any) -> None:
    """One line of JSON on stdout (queue ids are the other lines): the filters' counters."""
    if parent.transport is not None and runner.counters:
        parent.transport.write(json.dumps(runner.snapshot(), separators=(",", ":")).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gateway.smtp.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--listener", action="append", default=[], help="fd:family:endpoint")
    parser.add_argument("--drop-privileges", action="store_true", help="become gateway.user once listening")
    parser.add_argument("--dns-fd", type=int, help="the socket on which the main process asks DNS for us")
    args = parser.parse_args(argv)
    # filters that share state with the main process (connection counts) look at this
    os.environ["MAILGATE_WORKER"] = str(args.index)

    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner

    from gateway import collector
    from gateway import config as configuration
    from gateway.filters.reload import install_sighup, reloader
    from gateway.queue.spool import DirectorySpool
    from gateway.tap import account_of, become, make_reception, smtp_factory_maker

    stderr_log = StderrLog(reactor)
    atexit.register(stderr_log.flush)
    reactor.addSystemEventTrigger("after", "shutdown", stderr_log.flush)
    globalLogBeginner.beginLoggingTo([stderr_log], redirectStandardIO=False)  # type: ignore[list-item]
    cfg = configuration.load(args.config)
    spool = DirectorySpool(
        cfg.spool_dir,
        reactor=reactor,  # type: ignore[arg-type]
        hash_levels=cfg.gateway.hash_levels,
        id_tag=args.index,
        remember_commits=False,
    )
    parent = _ParentLink(reactor)
    StandardIO(parent, reactor=reactor)  # type: ignore[no-untyped-call]
    spool.subscribe(lambda queue_id: parent.transport.write(queue_id.encode() + b"\n"))  # type: ignore[union-attr]
    dns = None
    if args.dns_fd is not None:
        dns, _channel = worker_end(socket.socket(fileno=args.dns_fd), reactor)
    reception = make_reception(cfg, spool, reactor, dns=dns)
    # ETRN is carried out by the main process (the queue, the fetchers): pass it on
    reception.etrn = lambda domain: parent.transport.write(b"ETRN " + domain.encode("ascii") + b"\n")  # type: ignore[union-attr]
    install_sighup(reactor, reloader(reception.runner))  # the main process passes SIGHUP on
    report = LoopingCall(_report_counters, parent, reception.runner)
    report.clock = reactor
    report.start(COUNTERS_EVERY, now=False)
    make_factory, services = smtp_factory_maker(cfg, reception, reactor)
    for service in services:  # thread pools: stopped with the reactor, or they keep us alive
        service.startService()  # type: ignore[no-untyped-call]
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    listeners = {listener.endpoint: listener for listener in cfg.smtp.listeners}
    for spec in args.listener:
        fd_text, family, endpoint = spec.split(":", 2)
        fd = int(fd_text)
        reactor.adoptStreamPort(  # type: ignore[attr-defined]
            fd, socket.AF_INET6 if family == "6" else socket.AF_INET, make_factory(listeners[endpoint])
        )
        os.close(fd)  # adoptStreamPort duplicated it
    if args.drop_privileges:
        become(account_of(cfg))  # the main process started us as root, before it dropped
    collector.settle()
    reactor.run()


if __name__ == "__main__":
    main()
