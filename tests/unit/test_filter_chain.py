"""The chain runner: order, first deciding verdict wins, tags collect, failures and timeouts."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gateway.filters import Request
from gateway.filters.chain import NOTHING, ChainRunner, Link, Outcome, failure_verdict
from gateway.filters.testing import StaticFilter, raising
from gateway.interfaces import IPrepare
from gateway.model import ACCEPT, CONTINUE, Action, Direction, Envelope, Recipient, Session, Stage, Verdict

SESSION = Session("192.0.2.7")
ENVELOPE = Envelope("sender@example.org", (Recipient("bob@example.com"),))


def request(stage: Stage = Stage.RCPT, direction: Direction = Direction.INBOUND) -> Request:
    recipient = Recipient("bob@example.com") if stage is Stage.RCPT else None
    envelope = ENVELOPE if stage in (Stage.MAIL, Stage.RCPT, Stage.DATA) else None
    return Request(stage, direction, SESSION, envelope, recipient)


def outcome_of(deferred: Deferred[Outcome]) -> Outcome:
    found: list[Any] = []
    deferred.addBoth(found.append)
    assert found, "the runner has not decided yet"
    assert isinstance(found[0], Outcome), found[0]
    return found[0]


class RunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def runner(self, *filters: StaticFilter, on_failure: str = "defer", timeout: float = 5.0) -> ChainRunner:
        links = tuple(Link(f, timeout, failure_verdict(on_failure, f.name)) for f in filters)
        return ChainRunner({Direction.INBOUND: links}, self.clock)

    def test_no_opinion_anywhere_is_continue(self) -> None:
        first, second = StaticFilter("first"), StaticFilter("second")
        outcome = outcome_of(self.runner(first, second).run(request()))
        self.assertIs(outcome.verdict.action, Action.CONTINUE)
        self.assertEqual((len(first.requests), len(second.requests)), (1, 1))
        self.assertEqual(outcome.hits, ())

    def test_the_first_verdict_that_ends_the_stage_wins_and_the_rest_do_not_run(self) -> None:
        reject = StaticFilter("blocker", {Stage.RCPT: Verdict.reject("listed")})
        later = StaticFilter("later", {Stage.RCPT: ACCEPT})
        outcome = outcome_of(self.runner(StaticFilter("quiet"), reject, later).run(request()))
        self.assertEqual((outcome.verdict.action, outcome.decided_by), (Action.REJECT, "blocker"))
        self.assertEqual(later.requests, [])

    def test_order_is_the_configured_order(self) -> None:
        accept = StaticFilter("allow", {Stage.RCPT: ACCEPT})
        reject = StaticFilter("block", {Stage.RCPT: Verdict.reject("no")})
        self.assertIs(outcome_of(self.runner(accept, reject).run(request())).verdict.action, Action.ACCEPT)
        self.assertIs(outcome_of(self.runner(reject, accept).run(request())).verdict.action, Action.REJECT)

    def test_tags_and_copies_collect_and_the_chain_goes_on(self) -> None:
        tag = StaticFilter("tagger", {Stage.RCPT: Verdict(Action.TAG, "odd", 2.5, (("X-Odd", "yes"),))})
        copy = StaticFilter("audit", {Stage.RCPT: Verdict(Action.COPY_TO, target="audit@example.com")})
        defer = StaticFilter("grey", {Stage.RCPT: Verdict.defer("later")})
        outcome = outcome_of(self.runner(tag, copy, defer).run(request()))
        self.assertIs(outcome.verdict.action, Action.DEFER)
        self.assertEqual([t.headers for t in outcome.tags], [(("X-Odd", "yes"),)])
        self.assertEqual(outcome.copies, ("audit@example.com",))
        self.assertEqual([h.filter for h in outcome.hits], ["tagger", "audit", "grey"])
        self.assertEqual(outcome.score, 2.5)

    def test_filters_run_only_at_their_stages(self) -> None:
        connect_only = StaticFilter("greeter", {Stage.CONNECT: Verdict.reject("go away")})
        outcome = outcome_of(self.runner(connect_only).run(request(Stage.RCPT)))
        self.assertIs(outcome.verdict.action, Action.CONTINUE)
        self.assertEqual(connect_only.requests, [])

    def test_each_direction_has_its_own_chain(self) -> None:
        inbound = StaticFilter("strict", {Stage.MAIL: Verdict.reject("no")})
        runner = ChainRunner({Direction.INBOUND: (Link(inbound),), Direction.OUTBOUND: ()}, self.clock)
        self.assertIs(
            outcome_of(runner.run(request(Stage.MAIL, Direction.OUTBOUND))).verdict.action, Action.CONTINUE
        )
        self.assertIs(outcome_of(runner.run(request(Stage.MAIL))).verdict.action, Action.REJECT)

    def test_a_filter_that_raises_yields_defer_is_logged_and_counted(self) -> None:
        broken = StaticFilter("broken", {Stage.RCPT: raising(RuntimeError("database gone"))})
        after = StaticFilter("after")
        with capturedLogs() as events:
            outcome = outcome_of(self.runner(broken, after).run(request()))
        self.assertEqual((outcome.verdict.action, outcome.verdict.code), (Action.DEFER, 451))
        self.assertIn("broken", outcome.verdict.reason)
        self.assertEqual(after.requests, [])  # never passed on unchecked
        self.assertTrue(any("broken failed" in str(e.get("log_format", "")).format(**e) for e in events))
        self.assertEqual(self.flushLoggedErrors(RuntimeError)[0].getErrorMessage(), "database gone")
        self.assertTrue(outcome.hits[0].failed)

    def test_fail_open_only_where_configured(self) -> None:
        broken = StaticFilter("optional", {Stage.RCPT: raising(RuntimeError("x"))})
        after = StaticFilter("after", {Stage.RCPT: Verdict.reject("caught later")})
        outcome = outcome_of(self.runner(broken, after, on_failure="continue").run(request()))
        self.assertEqual(outcome.decided_by, "after")
        self.flushLoggedErrors(RuntimeError)
        reject = outcome_of(
            self.runner(StaticFilter("b", {Stage.RCPT: raising(RuntimeError())}), on_failure="reject").run(
                request()
            )
        )
        self.assertEqual(reject.verdict.code, 554)
        self.flushLoggedErrors(RuntimeError)

    def test_a_slow_filter_times_out_into_its_failure_verdict(self) -> None:
        slow = StaticFilter("slow", {Stage.RCPT: "wait"})
        runner = self.runner(slow, timeout=3.0)
        deferred = runner.run(request())
        found: list[Outcome] = []
        deferred.addCallback(found.append)
        self.clock.advance(2.9)
        self.assertEqual(found, [])
        self.clock.advance(0.2)
        self.assertIs(found[0].verdict.action, Action.DEFER)
        self.assertEqual(runner.counters["slow"].timeouts, 1)

    def test_many_waits_time_out_each_at_its_own_deadline_on_one_reactor_timer_per_timeout(self) -> None:
        slow = StaticFilter("slow", {Stage.RCPT: "wait"})
        slower = StaticFilter("slower", {Stage.MAIL: "wait"})
        links = (
            Link(slow, 3.0, failure_verdict("defer", "slow")),
            Link(slower, 10.0, failure_verdict("reject", "slower")),
        )
        runner = ChainRunner({Direction.INBOUND: links}, self.clock)
        found: list[tuple[int, Outcome]] = []

        def run(number: int, stage: Stage = Stage.RCPT) -> None:
            runner.run(request(stage)).addCallback(lambda outcome: found.append((number, outcome)))

        run(0)  # at 0 s, with 3 s
        self.clock.advance(1.0)
        run(1)  # at 1 s
        self.clock.advance(1.0)
        run(2)  # at 2 s
        self.clock.advance(0.5)
        run(9, Stage.MAIL)  # at 2.5 s, with 10 s
        assert len(self.clock.getDelayedCalls()) == 2  # one per timeout, however many wait
        slow.waiting[1].callback(CONTINUE)  # answered: it never times out
        assert [n for n, _ in found] == [1]
        assert runner.deadlines.waiting() == 3  # and is forgotten at once
        self.clock.advance(0.5)  # 3 s
        assert [n for n, _ in found] == [1, 0]
        self.clock.advance(1.0)  # 4 s: the answered one's deadline passes quietly
        assert [n for n, _ in found] == [1, 0]
        self.clock.advance(0.9)
        assert [n for n, _ in found] == [1, 0]
        self.clock.advance(0.1)  # 5 s
        assert [n for n, _ in found] == [1, 0, 2]
        assert [outcome.verdict.action for n, outcome in found if n != 1] == [Action.DEFER] * 2
        assert runner.counters["slow"].timeouts == 2
        self.clock.advance(7.4)
        assert len(found) == 3
        self.clock.advance(0.1)  # 12.5 s
        assert found[-1][0] == 9 and found[-1][1].verdict.action is Action.REJECT  # its own failure verdict
        assert runner.deadlines.waiting() == 0
        assert self.clock.getDelayedCalls() == []  # nothing left behind
        run(10)
        assert len(self.clock.getDelayedCalls()) == 1
        slow.waiting[-1].callback(CONTINUE)
        assert self.clock.getDelayedCalls() == []  # the last wait answered: its timer is gone too

    def test_waiting_filters_resume_the_chain_in_order(self) -> None:
        first = StaticFilter("dns", {Stage.RCPT: "wait"})
        second = StaticFilter("then", {Stage.RCPT: Verdict.reject("listed")})
        deferred = self.runner(first, second).run(request())
        found: list[Outcome] = []
        deferred.addCallback(found.append)
        self.assertEqual(second.requests, [])
        first.waiting[0].callback(CONTINUE)
        self.assertEqual(found[0].decided_by, "then")

    def test_an_already_fired_deferred_is_taken_at_once(self) -> None:
        fired = StaticFilter("fired", {Stage.RCPT: lambda r: succeed(CONTINUE)})
        last = StaticFilter("last", {Stage.RCPT: Verdict.reject("no")})
        self.assertEqual(outcome_of(self.runner(fired, last).run(request())).decided_by, "last")

    def test_a_filter_returning_garbage_is_a_failure_not_a_pass(self) -> None:
        odd = StaticFilter("odd", {Stage.RCPT: lambda r: "OK"})
        outcome = outcome_of(self.runner(odd).run(request()))
        self.assertIs(outcome.verdict.action, Action.DEFER)
        self.flushLoggedErrors(TypeError)

    def test_counters(self) -> None:
        reject = StaticFilter("block", {Stage.RCPT: Verdict.reject("no")})
        runner = self.runner(reject)
        for _ in range(3):
            runner.run(request())
        self.assertEqual(runner.counters["block"].calls, 3)
        self.assertEqual(runner.counters["block"].actions, {"reject": 3})

    def test_a_filter_that_lets_the_client_go_on_is_counted_with_its_time(self) -> None:
        # CONTINUE (nearly every answer) takes the runner's short path: still counted
        ticks = iter(range(100))
        passing = StaticFilter("pass", {Stage.RCPT: CONTINUE, Stage.MAIL: CONTINUE})
        also = StaticFilter("also", {Stage.RCPT: CONTINUE})
        runner = ChainRunner(
            {Direction.INBOUND: (Link(passing), Link(also))}, Clock(), timer=lambda: float(next(ticks))
        )
        for _ in range(2):
            outcome = outcome_of(runner.run(request()))
            self.assertIs(outcome.verdict, CONTINUE)
            self.assertEqual((outcome.decided_by, outcome.hits, outcome.tags), (None, (), ()))
        self.assertEqual((runner.counters["pass"].calls, runner.counters["pass"].seconds), (2, 2.0))
        self.assertEqual((runner.counters["also"].calls, runner.counters["also"].seconds), (2, 2.0))
        self.assertEqual(runner.counters["pass"].actions, {})
        self.assertEqual(len(passing.requests) + len(also.requests), 4)

    def test_a_filter_that_waits_then_lets_the_client_go_on_is_counted_with_its_wait(self) -> None:
        ticks = iter(range(0, 100, 5))
        dns = StaticFilter("dns", {Stage.RCPT: "wait"})
        then = StaticFilter("then", {Stage.RCPT: CONTINUE})
        runner = ChainRunner(
            {Direction.INBOUND: (Link(dns), Link(then))}, self.clock, timer=lambda: float(next(ticks))
        )
        found: list[Outcome] = []
        runner.run(request()).addCallback(found.append)
        assert found == [] and then.requests == []
        dns.waiting[0].callback(CONTINUE)  # answered 5 ticks after it was asked
        assert found == [NOTHING] and len(then.requests) == 1  # the stage went on, and passed
        assert (runner.counters["dns"].calls, runner.counters["dns"].seconds) == (1, 5.0)
        assert (runner.counters["then"].calls, runner.counters["then"].actions) == (1, {})
        assert runner.deadlines.waiting() == 0 and self.clock.getDelayedCalls() == []


@implementer(IPrepare)
class Preparing(StaticFilter):
    """A StaticFilter that can start early (IPrepare), and records when it was told to."""

    def __init__(self, name: str, answers: dict[Stage, Any] | None = None, *, fails: bool = False) -> None:
        super().__init__(name, answers)
        self.prepared: list[Request] = []
        self.fails = fails

    def prepare(self, request: Request) -> None:
        self.prepared.append(request)
        if self.fails:
            raise RuntimeError("the name server is on fire")


class PrepareTests(SynchronousTestCase):
    """While a filter makes a stage wait, those after it that can start early do (IPrepare)."""

    def setUp(self) -> None:
        self.clock = Clock()

    def runner(self, *filters: StaticFilter) -> ChainRunner:
        links = tuple(Link(f, 30.0, failure_verdict("defer", f.name)) for f in filters)
        return ChainRunner({Direction.INBOUND: links}, self.clock)

    def test_the_filters_after_a_waiting_one_start_while_it_waits_once_each(self) -> None:
        before = Preparing("before")
        waiter = StaticFilter("greet-wait", {Stage.CONNECT: "wait"})
        second_waiter = Preparing("slow-dns", {Stage.CONNECT: "wait"})
        after = Preparing("dnsbl", {Stage.CONNECT: CONTINUE})
        asked = request(Stage.CONNECT)
        result = self.runner(before, waiter, second_waiter, after).run(asked)
        assert (before.prepared, second_waiter.prepared, after.prepared) == ([], [asked], [asked])
        assert after.requests == []  # told to start, not asked to decide
        waiter.waiting[0].callback(CONTINUE)  # the second one waits now: nobody is told again
        assert (second_waiter.prepared, after.prepared) == ([asked], [asked])
        second_waiter.waiting[0].callback(CONTINUE)
        assert outcome_of(result).verdict is CONTINUE
        assert after.requests == [asked]

    def test_a_stage_that_never_waits_tells_nobody(self) -> None:
        later = Preparing("dnsbl")
        outcome_of(self.runner(StaticFilter("lists"), later).run(request(Stage.CONNECT)))
        assert later.prepared == []

    def test_a_stage_decided_by_the_waiting_filter_does_not_ask_the_prepared_one(self) -> None:
        waiter = StaticFilter("greet-wait", {Stage.CONNECT: "wait"})
        later = Preparing("dnsbl", {Stage.CONNECT: Verdict.reject("listed")})
        result = self.runner(waiter, later).run(request(Stage.CONNECT))
        waiter.waiting[0].callback(Verdict.reject("pregreet"))
        assert outcome_of(result).decided_by == "greet-wait"
        assert len(later.prepared) == 1 and later.requests == []

    def test_a_prepare_that_raises_is_logged_and_the_stage_goes_on(self) -> None:
        waiter = StaticFilter("greet-wait", {Stage.CONNECT: "wait"})
        broken = Preparing("dnsbl", {Stage.CONNECT: Verdict.reject("listed")}, fails=True)
        with capturedLogs() as events:
            result = self.runner(waiter, broken).run(request(Stage.CONNECT))
        assert [e["name"] for e in events if "prepare failed" in e.get("log_format", "")] == ["dnsbl"]
        self.flushLoggedErrors(RuntimeError)
        waiter.waiting[0].callback(CONTINUE)
        assert outcome_of(result).decided_by == "dnsbl"  # its check still decides


def test_counters_of_several_processes_add_up() -> None:
    from gateway.filters.chain import add_counters

    runner = ChainRunner(
        {Direction.INBOUND: (Link(StaticFilter("block", {Stage.RCPT: Verdict.reject("no")})),)}, Clock()
    )
    runner.run(request())
    total: dict[str, Any] = {}
    add_counters(total, runner.snapshot())
    add_counters(
        total, {"block": {"calls": 2, "seconds": 0.5, "failures": 1, "timeouts": 1, "actions": {"defer": 1}}}
    )
    assert total["block"]["calls"] == 3
    assert total["block"]["actions"] == {"reject": 1, "defer": 1}
    assert (total["block"]["failures"], total["block"]["timeouts"]) == (1, 1)


def test_a_filters_own_details_are_reported_and_add_up() -> None:
    from gateway.filters.chain import add_counters

    scanner = StaticFilter("clamav", {Stage.RCPT: Verdict.reject("virus")})
    scanner.details = lambda: {"Eicar-Test-Signature": 2}  # type: ignore[attr-defined]
    runner = ChainRunner({Direction.INBOUND: (Link(scanner),)}, Clock())
    runner.run(request())
    total: dict[str, Any] = {}
    add_counters(total, runner.snapshot())
    add_counters(total, {"clamav": {"calls": 1, "details": {"Eicar-Test-Signature": 1, "Other": 1}}})
    assert total["clamav"]["details"] == {"Eicar-Test-Signature": 3, "Other": 1}


def test_a_workers_counter_line_is_kept_and_queue_ids_still_go_to_the_queue() -> None:
    from gateway.smtp.workers import SmtpWorkers, WorkerLink

    queued: list[str] = []
    pool = SmtpWorkers(1, None, [], queued.append, Clock())
    link = WorkerLink(pool, 1)
    link.outReceived(
        b'ABC123\n{"lists": {"calls": 4, "seconds": 0.1, "failures": 0, "timeouts": 0, "actions": {}}}\nDEF'
    )
    link.outReceived(b"456\n")
    assert queued == ["ABC123", "DEF456"]
    assert pool.filter_counters[1]["lists"]["calls"] == 4
