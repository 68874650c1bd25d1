"""The queue manager: takes messages from the spool and runs their deliveries.

It works like Postfix's qmgr: new messages are woken in at once, the spool is
scanned every `queue_scan_interval` for deferred messages whose time has come,
deliveries run with a total and a per-destination concurrency limit, each
recipient's result is recorded, transient failures are retried on the
schedule, and after `max_attempts` (or a permanent failure) the sender gets
one RFC 3464 bounce. Nothing here writes message bytes: new messages (bounces)
go in through the spool like any other.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import DeliveryConfig
from gateway.delivery.router import Route, Router
from gateway.interfaces import ISpool, ITransport
from gateway.model import (
    Delivery,
    QueuedMessage,
    Recipient,
    RecipientResult,
    RecipientState,
    RecipientStatus,
)

log = Logger(namespace="mailgate.qmgr")

Bouncer = Callable[[QueuedMessage, list[RecipientState]], Deferred[object]]
TransportFactory = Callable[[Route], ITransport]


@attrs.frozen
class Destination:
    """What shares a per-destination concurrency limit: a transport and a domain."""

    transport: str
    domain: str

    def __str__(self) -> str:
        return f"{self.transport}:{self.domain}" if self.domain else self.transport


class QueueManager(Service):
    """Runs deliveries for the messages in the spool."""

    def __init__(
        self,
        spool: ISpool,
        router: Router,
        transports: TransportFactory,
        bouncer: Bouncer,
        settings: DeliveryConfig,
        clock: IReactorTime,
    ) -> None:
        self.spool = spool
        self.router = router
        self.transports = transports
        self.bouncer = bouncer
        self.settings = settings
        self.clock = clock
        self.waiting: collections.deque[str] = collections.deque()
        self.waiting_set: set[str] = set()
        self.in_flight: dict[str, float] = {}  # queue id -> when the round started
        self.after_round: dict[str, str] = {}  # queue id -> "hold" / "delete" requested meanwhile
        self.destinations: dict[Destination, DeferredSemaphore] = {}
        self._scanner = LoopingCall(self.scan)
        self._scanner.clock = clock
        self._wakeup: IDelayedCall | None = None

    # --- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._scanner.start(self.settings.queue_scan_interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._scanner.running:
            self._scanner.stop()
        return None

    # --- taking messages in ---------------------------------------------------

    def wake(self, queue_id: str) -> None:
        """A new message is in the spool: deliver it as soon as there is room."""
        if queue_id in self.waiting_set or queue_id in self.in_flight:
            return
        self.waiting.append(queue_id)
        self.waiting_set.add(queue_id)
        self._run()

    def scan(self) -> None:
        """Pick up what is due: incoming messages not yet known, deferred ones whose time came."""
        now = self.clock.seconds()
        states = self.spool.states()
        for queue_id in sorted(q for q, state in states.items() if state == "incoming"):
            self.wake(queue_id)
        for queue_id in sorted(q for q, state in states.items() if state == "deferred"):
            if queue_id in self.in_flight or queue_id in self.waiting_set:
                continue
            try:
                message = self.spool.load(queue_id)
            except (KeyError, OSError, ValueError):
                continue
            if message.next_attempt <= now:
                self.wake(queue_id)

    def _run(self) -> None:
        while self.waiting and len(self.in_flight) < self.settings.concurrency:
            queue_id = self.waiting.popleft()
            self.waiting_set.discard(queue_id)
            self.in_flight[queue_id] = self.clock.seconds()
            self._round(queue_id).addBoth(self._round_done, queue_id)

    def _round_done(self, result: object, queue_id: str) -> None:
        self.in_flight.pop(queue_id, None)
        if isinstance(result, Failure):
            if not self.running:
                # stopping: the spool no longer takes updates; the message stays queued
                log.info(
                    "{queue_id}: delivery round cut short by shutdown; it stays queued", queue_id=queue_id
                )
                return
            log.failure("{queue_id}: delivery round failed", result, queue_id=queue_id)
        if self.running:
            self._run()

    # --- one delivery round for one message ------------------------------------

    @inlineCallbacks
    def _round(self, queue_id: str):  # type: ignore[no-untyped-def]
        try:
            message = self.spool.load(queue_id)
        except KeyError:
            return  # deleted meanwhile
        if message.state in ("hold", "corrupt"):
            return
        pending = message.pending()
        if not pending:
            yield self.spool.remove(queue_id)
            return
        groups = self._group(pending)
        results: dict[str, RecipientResult] = {}
        outcomes: list[tuple[bool, Any]]
        if len(groups) == 1:  # the usual case: no DeferredList for one delivery
            (((route, destination), recipients),) = groups.items()
            delivering = self._deliver(message, route, destination, recipients)  # raises as before
            try:
                value = yield delivering
            except Exception:
                outcomes = [(False, Failure())]  # type: ignore[no-untyped-call]
            else:
                outcomes = [(True, value)]
        else:
            outcomes = yield DeferredList(
                [
                    self._deliver(message, route, destination, recipients)
                    for (route, destination), recipients in groups.items()
                ],
                consumeErrors=True,
            )
        for (ok, value), ((route, _destination), recipients) in zip(outcomes, groups.items(), strict=True):
            if ok:
                for result in value:
                    results[result.recipient.address] = result
            else:
                log.failure(
                    "{queue_id}: transport {transport} failed",
                    value,
                    queue_id=queue_id,
                    transport=route.spec.text,
                )
                for recipient in recipients:
                    results[recipient.address] = RecipientResult(
                        recipient, 451, "4.3.0", "internal error in the transport; will retry", "none"
                    )
        yield self._record(message, results)

    def _group(self, pending: Iterable[RecipientState]) -> dict[tuple[Route, Destination], list[Recipient]]:
        groups: dict[tuple[Route, Destination], list[Recipient]] = {}
        for state in pending:
            address = state.recipient.address
            route = self.router.route(address)
            domain = address.rpartition("@")[2].lower()
            # MX and relay deliveries go per domain; fixed hosts and local stores per route
            key_domain = domain if route.spec.kind in ("mx", "relay") else ""
            groups.setdefault((route, Destination(route.spec.text, key_domain)), []).append(state.recipient)
        return groups

    def _deliver(
        self, message: QueuedMessage, route: Route, destination: Destination, recipients: list[Recipient]
    ) -> Deferred[list[RecipientResult]]:
        semaphore = self.destinations.get(destination)
        if semaphore is None:
            semaphore = self.destinations[destination] = DeferredSemaphore(self.settings.per_destination)
        transport = self.transports(route)
        delivery = Delivery(
            queue_id=message.queue_id,
            envelope=message.envelope,
            recipients=tuple(recipients),
            message_path=self.spool.message_path(message.queue_id),
            size=message.size,
        )
        return semaphore.run(transport.deliver, delivery)

    @inlineCallbacks
    def _record(self, message: QueuedMessage, results: dict[str, RecipientResult]):  # type: ignore[no-untyped-def]
        now = self.clock.seconds()
        attempts = message.attempts + 1
        give_up = attempts >= self.settings.max_attempts
        states: list[RecipientState] = []
        newly_failed: list[RecipientState] = []
        for state in message.recipients:
            result = results.get(state.recipient.address)
            if state.status is not RecipientStatus.PENDING or result is None:
                states.append(state)
                continue
            reply = result.text  # the remote reply with its code, or our own reason (as Postfix logs)
            if result.delivered:
                status, word = RecipientStatus.DELIVERED, "sent"
            elif result.permanent:
                status, word = RecipientStatus.FAILED, "bounced"
            elif give_up:
                status, word = RecipientStatus.FAILED, "expired"
                reply = f"{reply} (gave up after {attempts} attempts)"
            else:
                status, word = RecipientStatus.PENDING, "deferred"
            new = attrs.evolve(
                state,
                code=result.code,
                dsn=result.enhanced,
                status=status,
                attempts=state.attempts + 1,
                last_reply=reply,
                relay=result.relay,
            )
            states.append(new)
            if status is RecipientStatus.FAILED:
                newly_failed.append(new)
            log.info(
                "{queue_id}: to=<{rcpt}>, relay={relay}, delay={delay:.2f}, attempts={attempts}, "
                "dsn={dsn}, status={word} ({reply})",
                queue_id=message.queue_id,
                rcpt=state.recipient.address,
                relay=result.relay,
                delay=max(0.0, time.time() - message.arrived),
                attempts=attempts,
                word=word,
                dsn=result.enhanced or f"{result.code // 100}.0.0",
                reply=reply,
            )
        updated = attrs.evolve(message, recipients=tuple(states), attempts=attempts)
        if newly_failed:
            yield self.bouncer(updated, newly_failed)
        requested = self.after_round.pop(message.queue_id, None)
        if requested == "delete":
            yield self.spool.remove(message.queue_id)
            return
        if not updated.pending():
            log.info("{queue_id}: removed", queue_id=message.queue_id)
            yield self.spool.remove(message.queue_id)
            return
        delay = self.retry_delay(attempts)
        next_state = "hold" if requested == "hold" else "deferred"
        updated = attrs.evolve(updated, state=next_state, next_attempt=now + delay)
        yield self.spool.update(updated)
        self._schedule_scan(delay)

    def retry_delay(self, attempts: int) -> float:
        """Seconds until the next round after `attempts` rounds (the last interval repeats)."""
        schedule = self.settings.retry_schedule
        return schedule[min(attempts, len(schedule)) - 1]

    def _schedule_scan(self, delay: float) -> None:
        # a retry due before the next regular scan gets its own wake-up
        if delay >= self.settings.queue_scan_interval:
            return
        if self._wakeup is not None and self._wakeup.active():
            if self._wakeup.getTime() <= self.clock.seconds() + delay:
                return
            self._wakeup.cancel()
        self._wakeup = self.clock.callLater(delay, self.scan)

    # --- operator actions ---------------------------------------------------

    def summary(self) -> list[dict[str, object]]:
        """Every message in the spool, for `mailgatectl queue list`."""
        rows: list[dict[str, object]] = []
        states = self.spool.states()
        for state in ("incoming", "active", "deferred", "hold", "corrupt"):
            for queue_id in sorted(q for q, each in states.items() if each == state):
                if state == "corrupt":
                    rows.append({"queue_id": queue_id, "state": "corrupt"})
                    continue
                try:
                    message = self.spool.load(queue_id)
                except (KeyError, OSError, ValueError):
                    continue
                rows.append(describe(message, "active" if queue_id in self.in_flight else state))
        return rows

    def hold(self, queue_id: str) -> Deferred[None]:
        if queue_id in self.in_flight:
            self.after_round[queue_id] = "hold"
            return Deferred.fromCoroutine(_done())
        message = self.spool.load(queue_id)
        self._forget(queue_id)
        return self.spool.update(attrs.evolve(message, state="hold"))

    def release(self, queue_id: str) -> Deferred[None]:
        message = self.spool.load(queue_id)
        if message.state != "hold":
            raise ValueError(f"{queue_id} is not on hold (it is {message.state})")
        # out of the quarantine too: its record stays in the log, not with the message
        d = self.spool.update(attrs.evolve(message, state="deferred", next_attempt=0.0, quarantine=None))
        d.addCallback(lambda _: self.wake(queue_id))
        return d

    def delete(self, queue_id: str) -> Deferred[None]:
        if queue_id in self.in_flight:
            self.after_round[queue_id] = "delete"
            return Deferred.fromCoroutine(_done())
        self.spool.load(queue_id)  # KeyError if unknown
        self._forget(queue_id)
        return self.spool.remove(queue_id)

    def flush(self, queue_id: str | None = None) -> int:
        """Deliver deferred mail now (one message, or all). Returns how many were woken."""
        ids = (
            [queue_id] if queue_id else list(self.spool.list("deferred")) + list(self.spool.list("incoming"))
        )
        for each in ids:
            message = self.spool.load(each)
            if message.state == "hold":
                raise ValueError(f"{each} is on hold: release it instead")
            self.wake(each)
        return len(ids)

    def flush_domain(self, domain: str) -> int:
        """ETRN: deliver now the deferred mail with a pending recipient in `domain` (or under it)."""
        domain = domain.lower().rstrip(".")
        woken = 0
        for queue_id in list(self.spool.list("deferred")):
            try:
                message = self.spool.load(queue_id)
            except (KeyError, OSError, ValueError):
                continue
            for state in message.pending():
                at = state.recipient.address.rpartition("@")[2].lower().rstrip(".")
                if at == domain or at.endswith("." + domain):
                    self.wake(queue_id)
                    woken += 1
                    break
        return woken

    def _forget(self, queue_id: str) -> None:
        if queue_id in self.waiting_set:
            self.waiting_set.discard(queue_id)
            self.waiting.remove(queue_id)


async def _done() -> None:
    return None


def describe(message: QueuedMessage, state: str) -> dict[str, object]:
    return {
        "queue_id": message.queue_id,
        "state": state,
        "arrived": message.arrived,
        "size": message.size,
        "sender": message.envelope.mail_from,
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "recipients": [
            {
                "address": r.recipient.address,
                "status": r.status.value,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "relay": r.relay,
            }
            for r in message.recipients
        ],
    }
