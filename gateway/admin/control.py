"""The local control socket: `mailgatectl` talks to the running gateway here.

One JSON object per line each way, on a UNIX socket readable only by the
gateway's user (and root). JSON lines rather than AMP because AMP caps a value
at 64 KiB, and a queue listing is longer than that on a busy day.

Request: ``{"command": "queue.list"}``, ``{"command": "queue.hold", "id": "..."}``
or ``{"command": "reload"}`` (the filters re-read their files).
Reply: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from gateway.delivery.manager import QueueManager, describe
from gateway.interfaces import ISpool
from gateway.quarantine import QuarantineRoom, Selection
from gateway.queue import open_message

log = Logger(namespace="mailgate.admin")

HEADERS_SHOWN = 64 * 1024


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, commands: dict[str, Callable[[dict[str, Any]], Any]]) -> None:
        self.commands = commands

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            command = self.commands[request["command"]]
        except (ValueError, KeyError, TypeError):
            self._send({"ok": False, "error": f"unknown or malformed request: {line[:100]!r}"})
            return
        log.info("control: {command} {id}", command=request["command"], id=request.get("id", ""))
        maybeDeferred(command, request).addCallbacks(
            lambda result: self._send({"ok": True, "result": result}), self._failed
        )

    def _failed(self, failure: Failure) -> None:
        if failure.check(KeyError):  # type: ignore[no-untyped-call]
            self._send({"ok": False, "error": f"no such message: {failure.getErrorMessage()}"})
        elif failure.check(ValueError):  # type: ignore[no-untyped-call]
            self._send({"ok": False, "error": failure.getErrorMessage()})
        else:
            log.failure("control command failed", failure)
            self._send({"ok": False, "error": f"internal error: {failure.getErrorMessage()}"})

    def _send(self, reply: dict[str, Any]) -> None:
        self.transport.write(json.dumps(reply).encode() + b"\n")  # type: ignore[union-attr]


class ControlFactory(Factory):
    """Builds the command table from the queue manager and the spool.

    `reload` runs a reload of the filters (and the SMTP workers') and returns a
    one-line summary; it raises ValueError, with the reason, when a filter kept
    its old data (`gateway.filters.reload.reloader` makes one).
    """

    def __init__(
        self,
        manager: QueueManager,
        spool: ISpool,
        started: float | None = None,
        reload: Callable[[], str] | None = None,
        filter_counters: Callable[[], dict[str, Any]] | None = None,
        quarantine: QuarantineRoom | None = None,
        fetch: Any = None,
        dns: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        self.dns = dns  # the filters' DNS numbers (None before its first lookup)
        self.manager = manager
        self.spool = spool
        self.started = started or time.time()
        self.reload = reload
        self.filter_counters = filter_counters
        self.quarantine = quarantine or QuarantineRoom(spool, manager)
        self.fetch = fetch  # gateway.fetch.poller.FetchService, when accounts are configured

    def buildProtocol(self, addr: object) -> ControlProtocol:
        protocol = ControlProtocol(
            {
                "status": self.status,
                "queue.list": lambda r: self.manager.summary(),
                "queue.show": self.show,
                "queue.hold": lambda r: self._then(self.manager.hold(r["id"]), r["id"]),
                "queue.release": lambda r: self._then(self.manager.release(r["id"]), r["id"]),
                "queue.delete": lambda r: self._then(self.manager.delete(r["id"]), r["id"]),
                "queue.flush": lambda r: self.manager.flush(r.get("id")),
                "reload": self.run_reload,
                "fetch.now": self.fetch_now,
                "fetch.status": lambda r: self.fetch.status() if self.fetch is not None else {},
                "quarantine.list": self.quarantine_list,
                "quarantine.show": self.quarantine_show,
                "quarantine.release": lambda r: self.quarantine.release(r["id"]),
                "quarantine.delete": lambda r: self.quarantine.delete(r["id"]),
                "quarantine.train": lambda r: self.quarantine.train(r["id"], bool(r["spam"])),
            }
        )
        protocol.factory = self
        return protocol

    @staticmethod
    def _then(d: Deferred[Any], queue_id: str) -> Deferred[str]:
        return d.addCallback(lambda _: queue_id)

    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        states = list(self.spool.states().values())
        counts = {state: states.count(state) for state in ("incoming", "deferred", "hold", "corrupt")}
        counts["active"] = len(self.manager.in_flight)
        status: dict[str, Any] = {"pid": os.getpid(), "uptime": time.time() - self.started, "queue": counts}
        if self.filter_counters is not None:
            status["filters"] = self.filter_counters()
        if self.fetch is not None:
            status["fetch"] = self.fetch.status()
        numbers = self.dns() if self.dns is not None else None
        if numbers is not None:
            status["dns"] = numbers
        return status

    def run_reload(self, request: dict[str, Any]) -> str:
        if self.reload is None:
            raise ValueError("this gateway has nothing to reload")
        return self.reload()

    def show(self, request: dict[str, Any]) -> dict[str, Any]:
        queue_id = request["id"]
        message = self.spool.load(queue_id)
        state = "active" if queue_id in self.manager.in_flight else message.state
        shown = describe(message, state)
        with open_message(self.spool.message_path(queue_id)) as handle:
            head = handle.read(HEADERS_SHOWN)
        end = head.find(b"\r\n\r\n")
        shown["headers"] = (head if end < 0 else head[: end + 2]).decode("utf-8", "replace")
        return shown

    def fetch_now(self, request: dict[str, Any]) -> Any:
        if self.fetch is None:
            raise ValueError("no fetch accounts are configured ([[fetch.accounts]])")
        return self.fetch.poll_now(request.get("account"))  # ValueError for an unknown name

    def quarantine_list(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        selection = Selection(
            since=request.get("since"),
            until=request.get("until"),
            recipient=request.get("recipient") or "",
            reason=request.get("reason") or "",
            kind=request.get("kind") or "",
        )
        return [self.quarantine.row(message) for message in self.quarantine.messages(selection)]

    def quarantine_show(self, request: dict[str, Any]) -> dict[str, Any]:
        queue_id = request["id"]
        shown = self.quarantine.row(self.quarantine.load(queue_id))
        with open_message(self.spool.message_path(queue_id)) as handle:
            shown["text"] = handle.read(HEADERS_SHOWN).decode("utf-8", "replace")
        return shown
