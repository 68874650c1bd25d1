"""The queue manager: routing, per-recipient results, retries on the schedule, bounces."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gateway.config import DeliveryConfig, RouteConfig
from gateway.delivery.manager import QueueManager
from gateway.delivery.router import Route, Router, parse_transport
from gateway.interfaces import ITransport
from gateway.model import (
    Delivery,
    Envelope,
    QueuedMessage,
    Recipient,
    RecipientResult,
    RecipientState,
    RecipientStatus,
    Session,
)
from gateway.queue.memory import MemorySpool

Script = Callable[[Delivery, Recipient], tuple[int, str]]


@implementer(ITransport)
class ScriptedTransport:
    """Answers each recipient from a script; remembers every delivery; can be held."""

    def __init__(self, name: str, script: Script) -> None:
        self.name = name
        self.script = script
        self.deliveries: list[Delivery] = []
        self.held: list[tuple[Deferred[list[RecipientResult]], Delivery]] = []
        self.hold = False

    def answer(self, delivery: Delivery) -> list[RecipientResult]:
        results = []
        for recipient in delivery.recipients:
            code, text = self.script(delivery, recipient)
            results.append(RecipientResult(recipient, code, f"{code // 100}.0.0", text, f"{self.name}[test]"))
        return results

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        self.deliveries.append(delivery)
        if self.hold:
            d: Deferred[list[RecipientResult]] = Deferred()
            self.held.append((d, delivery))
            return d
        return succeed(self.answer(delivery))

    def release(self) -> None:
        held, self.held = self.held, []
        for d, delivery in held:
            d.callback(self.answer(delivery))


class QueueManagerTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = MemorySpool(now=self.clock.seconds)
        self.bounced: list[tuple[QueuedMessage, list[RecipientState]]] = []
        self.settings = DeliveryConfig(
            retry_schedule=(60.0, 300.0),
            max_attempts=4,
            queue_scan_interval=15.0,
            concurrency=2,
            per_destination=1,
        )
        self.replies: dict[str, int] = {}
        self.transports: dict[str, ScriptedTransport] = {}
        router = Router((RouteConfig("internal.test", "smtp:[192.0.2.10]:25"), RouteConfig("*", "mx")))
        self.manager = QueueManager(
            self.spool, router, self.transport_for, self.bounce, self.settings, self.clock
        )
        self.spool.subscribe(self.manager.wake)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def transport_for(self, route: Route) -> ScriptedTransport:
        name = route.spec.text
        if name not in self.transports:
            self.transports[name] = ScriptedTransport(
                name, lambda delivery, recipient: (self.replies.get(recipient.address, 250), "scripted")
            )
        return self.transports[name]

    def bounce(self, message: QueuedMessage, failed: list[RecipientState]) -> Deferred[object]:
        self.bounced.append((message, failed))
        return succeed(None)

    def enqueue(self, *recipients: str, sender: str = "alice@sender.test") -> str:
        incoming = self.spool.new_message()
        incoming.write(b"Subject: test\r\n\r\nbody\r\n")
        envelope = Envelope(sender, tuple(Recipient(r) for r in recipients))
        result: list[str] = []
        incoming.commit(envelope, Session("192.0.2.1")).addCallback(result.append)
        return result[0]

    def statuses(self, queue_id: str) -> dict[str, RecipientStatus]:
        return {r.recipient.address: r.status for r in self.spool.load(queue_id).recipients}

    def test_delivered_message_is_removed_at_once(self) -> None:
        queue_id = self.enqueue("bob@internal.test")
        self.assertNotIn(queue_id, self.spool.messages)
        [delivery] = self.transports["smtp:[192.0.2.10]:25"].deliveries
        self.assertEqual([r.address for r in delivery.recipients], ["bob@internal.test"])
        self.assertEqual(self.bounced, [])

    def test_recipients_are_grouped_by_route_and_by_domain_for_mx(self) -> None:
        self.enqueue("a@internal.test", "b@internal.test", "c@one.test", "d@two.test", "e@one.test")
        fixed = self.transports["smtp:[192.0.2.10]:25"].deliveries
        self.assertEqual(
            [[r.address for r in d.recipients] for d in fixed], [["a@internal.test", "b@internal.test"]]
        )
        mx = self.transports["mx"].deliveries
        self.assertEqual(
            sorted([r.address for r in d.recipients] for d in mx),
            [["c@one.test", "e@one.test"], ["d@two.test"]],
        )

    def test_transient_failure_defers_then_retries_on_schedule(self) -> None:
        self.replies["bob@internal.test"] = 451
        queue_id = self.enqueue("bob@internal.test")
        message = self.spool.load(queue_id)
        self.assertEqual(message.state, "deferred")
        self.assertEqual(message.attempts, 1)
        self.assertEqual(message.next_attempt, self.clock.seconds() + 60)
        self.assertEqual(message.recipients[0].last_reply, "scripted")
        self.clock.advance(59)
        self.assertEqual(len(self.transports["smtp:[192.0.2.10]:25"].deliveries), 1)
        self.replies["bob@internal.test"] = 250
        self.clock.advance(16)  # the next scan after the retry time
        self.assertEqual(len(self.transports["smtp:[192.0.2.10]:25"].deliveries), 2)
        self.assertNotIn(queue_id, self.spool.messages)

    def test_schedule_last_interval_repeats(self) -> None:
        self.assertEqual([self.manager.retry_delay(n) for n in (1, 2, 3, 9)], [60, 300, 300, 300])

    def test_permanent_failure_bounces_only_that_recipient_and_keeps_the_other(self) -> None:
        self.replies["bad@internal.test"] = 550
        self.replies["later@internal.test"] = 451
        queue_id = self.enqueue("ok@internal.test", "bad@internal.test", "later@internal.test")
        self.assertEqual(
            self.statuses(queue_id),
            {
                "ok@internal.test": RecipientStatus.DELIVERED,
                "bad@internal.test": RecipientStatus.FAILED,
                "later@internal.test": RecipientStatus.PENDING,
            },
        )
        [(_, failed)] = self.bounced
        self.assertEqual([r.recipient.address for r in failed], ["bad@internal.test"])
        # the next round delivers only the pending one, and bounces nothing again
        self.replies["later@internal.test"] = 250
        self.clock.advance(75)
        last = self.transports["smtp:[192.0.2.10]:25"].deliveries[-1]
        self.assertEqual([r.address for r in last.recipients], ["later@internal.test"])
        self.assertEqual(len(self.bounced), 1)
        self.assertNotIn(queue_id, self.spool.messages)

    def test_gives_up_after_max_attempts_and_bounces(self) -> None:
        self.replies["bob@internal.test"] = 421
        queue_id = self.enqueue("bob@internal.test")
        for _ in range(10):
            self.clock.advance(300)
        self.assertNotIn(queue_id, self.spool.messages)
        self.assertEqual(len(self.transports["smtp:[192.0.2.10]:25"].deliveries), 4)
        [(_, failed)] = self.bounced
        self.assertIn("gave up after 4 attempts", failed[0].last_reply or "")

    def test_concurrency_limit_queues_the_rest(self) -> None:
        self.transport_for(Route("internal.test", parse_transport("smtp:[192.0.2.10]:25")))
        fixed = self.transports["smtp:[192.0.2.10]:25"]
        fixed.hold = True
        ids = [self.enqueue(f"u{n}@internal.test") for n in range(5)]
        # concurrency 2 messages in flight; per destination 1 delivery at a time
        self.assertEqual(len(self.manager.in_flight), 2)
        self.assertEqual(len(fixed.deliveries), 1)
        for _ in range(10):
            fixed.release()
        self.assertEqual(len(fixed.deliveries), 5)
        self.assertFalse(any(queue_id in self.spool.messages for queue_id in ids))

    def test_transport_that_raises_defers_instead_of_losing_mail(self) -> None:
        def broken(delivery: Delivery, recipient: Recipient) -> tuple[int, str]:
            raise RuntimeError("bug in a transport")

        self.transports["smtp:[192.0.2.10]:25"] = ScriptedTransport("smtp:[192.0.2.10]:25", broken)
        queue_id = self.enqueue("bob@internal.test")
        message = self.spool.load(queue_id)
        self.assertEqual(message.state, "deferred")
        self.assertIn("internal error", message.recipients[0].last_reply or "")
        self.flushLoggedErrors(RuntimeError)

    def test_hold_release_delete_flush(self) -> None:
        self.replies["bob@internal.test"] = 451
        queue_id = self.enqueue("bob@internal.test")
        self.manager.hold(queue_id)
        self.assertEqual(self.spool.load(queue_id).state, "hold")
        self.clock.advance(1000)
        self.assertEqual(len(self.transports["smtp:[192.0.2.10]:25"].deliveries), 1)  # held: no retry
        self.replies["bob@internal.test"] = 250
        self.manager.release(queue_id)
        self.assertNotIn(queue_id, self.spool.messages)

        self.replies["carol@internal.test"] = 451
        other = self.enqueue("carol@internal.test")
        self.assertEqual(self.manager.flush(), 1)
        self.assertEqual(len(self.transports["smtp:[192.0.2.10]:25"].deliveries), 4)
        self.manager.delete(other)
        self.assertNotIn(other, self.spool.messages)

    def test_release_of_a_message_not_on_hold_is_an_error(self) -> None:
        self.replies["bob@internal.test"] = 451
        queue_id = self.enqueue("bob@internal.test")
        with self.assertRaises(ValueError):
            self.manager.release(queue_id)

    def test_scan_picks_up_incoming_left_from_before_a_restart(self) -> None:
        spool = self.spool
        message = QueuedMessage(
            spool.new_message().queue_id,
            Envelope("a@b.test", (Recipient("x@internal.test"),)),
            (RecipientState(Recipient("x@internal.test")),),
            arrived=0,
            size=10,
        )
        spool.messages[message.queue_id] = message
        spool.contents[message.queue_id] = b"x"
        self.manager.scan()
        self.assertNotIn(message.queue_id, spool.messages)

    def test_summary_lists_states(self) -> None:
        self.replies["bob@internal.test"] = 451
        queue_id = self.enqueue("bob@internal.test")
        [row] = self.manager.summary()
        self.assertEqual((row["queue_id"], row["state"]), (queue_id, "deferred"))
        self.assertEqual(row["recipients"][0]["last_reply"], "scripted")  # type: ignore[index]
