"""The chain runner: runs a stage's filters in order and owns their failures.

Per stage, the filters of the session's chain that act on it run in the order of
the config. The first verdict that ends the stage wins (REJECT, DEFER, ACCEPT,
QUARANTINE, DISCARD, REDIRECT); TAG and COPY-TO are collected and the chain goes
on. A filter that raises or takes longer than its timeout yields its failure
verdict (DEFER unless the administrator chose otherwise), is logged with its name
and counted: mail never passes silently because a filter broke.

Filters that answer at once (most pre-DATA checks) cost no Deferred per filter:
the runner only chains callbacks when a filter really waits (DNS, the store).
When one does, the filters after it in the stage that can start their own slow
work early (`IPrepare`: the DNSBL lookups during the greet wait, as postscreen
does) are told to, once per stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.filters import Request
from gateway.interfaces import IFilter, IPrepare, ISessionObserver
from gateway.model import CONTINUE, Action, Direction, Stage, Verdict

log = Logger(namespace="mailgate.filter")


@attrs.frozen
class Link:
    """A filter in a chain, with what the runner does when it fails."""

    filter: Any  # IFilter
    timeout: float = 30.0
    on_failure: Verdict = attrs.field(factory=lambda: failure_verdict("defer", "?"))

    @property
    def name(self) -> str:
        return str(self.filter.name)


def failure_verdict(choice: str, name: str) -> Verdict:
    """The verdict for a broken filter: "defer" (the default), "reject" or "continue"."""
    if choice == "continue":
        return CONTINUE
    if choice == "reject":
        return Verdict.reject(f"Rejected: filter {name} failed", 554, "5.7.1")
    return Verdict.defer(f"Temporary failure in filter {name}, try again later", 451, "4.3.0")


@attrs.frozen
class Hit:
    """A filter that had an opinion (or failed), for the log and X-Mailgate-Filters."""

    filter: str
    stage: Stage
    action: Action
    reason: str
    score: float
    elapsed: float  # seconds the check took
    recipient: str | None = None
    failed: bool = False

    def describe(self) -> str:
        score = f" score={self.score:g}" if self.score else ""
        failed = " failed" if self.failed else ""
        return f"{self.filter}={self.action.value}{failed}{score} ({self.elapsed * 1000:.1f} ms)"


@attrs.frozen
class Outcome:
    """What a stage's chain decided.

    `verdict` is the one that ended the stage (CONTINUE when none did) and
    `decided_by` its filter; `tags` are the TAG verdicts met on the way and
    `copies` the COPY-TO addresses; `hits` every filter that had an opinion.
    """

    verdict: Verdict = CONTINUE
    decided_by: str | None = None
    tags: tuple[Verdict, ...] = ()
    copies: tuple[str, ...] = ()
    hits: tuple[Hit, ...] = ()

    @property
    def score(self) -> float:
        return sum(hit.score for hit in self.hits)


NOTHING = Outcome()  # a stage where no filter had an opinion (frozen: one serves all)


@attrs.define
class FilterCounters:
    """How often one filter was asked, what it said, and how it failed."""

    calls: int = 0
    seconds: float = 0.0
    failures: int = 0
    timeouts: int = 0
    actions: dict[str, int] = attrs.field(factory=dict)


def add_counters(total: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> None:
    """Add one process's `ChainRunner.snapshot()` into `total` (several SMTP processes)."""
    for name, counters in more.items():
        into = total.setdefault(
            name, {"calls": 0, "seconds": 0.0, "failures": 0, "timeouts": 0, "actions": {}}
        )
        for key in ("calls", "seconds", "failures", "timeouts"):
            into[key] += counters.get(key, 0)
        for action, number in counters.get("actions", {}).items():
            into["actions"][action] = into["actions"].get(action, 0) + number
        for key, number in counters.get("details", {}).items():
            details = into.setdefault("details", {})
            details[key] = details.get(key, 0) + number


class ChainRunner:
    """The chains of one process, per direction, and the runner that walks them."""

    def __init__(
        self,
        chains: dict[Direction, tuple[Link, ...]],
        clock: IReactorTime,
        *,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.chains = chains
        self.clock = clock
        self.timer = timer
        self.deadlines = _Deadlines(clock)  # of the filters that wait
        self.counters: dict[str, FilterCounters] = {}
        # each stage's links, their counters in the same order (a walk counts by index)
        # and those of them that can start early (IPrepare) with their place: one
        # lookup per stage run; a stage without links is not there
        self._stages: dict[tuple[Direction, Stage], _Stage] = {}
        self._observers: dict[Direction, tuple[Any, ...]] = {}
        for direction, links in chains.items():
            for link in links:
                self.counters.setdefault(link.name, FilterCounters())
            for stage in Stage:
                staged = tuple(link for link in links if stage in link.filter.stages)
                if staged:
                    self._stages[direction, stage] = (
                        staged,
                        tuple(self.counters[link.name] for link in staged),
                        tuple(
                            (index, link.filter)
                            for index, link in enumerate(staged)
                            if IPrepare.providedBy(link.filter)
                        ),
                        tuple(link.filter.check for link in staged),
                    )
            connect = self._stages.get((direction, Stage.CONNECT), ((), (), (), ()))[0]
            self._observers[direction] = tuple(
                link.filter for link in connect if ISessionObserver.providedBy(link.filter)
            )

    def session_observers(self, direction: Direction) -> tuple[Any, ...]:
        """The filters of `direction`'s connect stage that want to hear of a session's end."""
        return self._observers.get(direction, ())

    def all_filters(self) -> Iterator[Any]:
        """Every distinct filter object in any chain (for reload and session hooks)."""
        seen: set[int] = set()
        for links in self.chains.values():
            for link in links:
                if id(link.filter) not in seen:
                    seen.add(id(link.filter))
                    yield link.filter

    def run(self, request: Request) -> Deferred[Outcome]:
        """Run the request's stage of its direction's chain; never fails.

        The usual stage, where every filter answers CONTINUE at once, is run
        here and only counted; the first other answer (a verdict, a Deferred,
        an exception) hands the stage to a `_Walk` from that filter on.
        """
        staged = self._stages.get((request.direction, request.stage))
        if staged is None:
            return succeed(NOTHING)
        links, counters, preparers, checks = staged
        timer = self.timer
        started = timer()  # one reading serves as one filter's end and the next one's start
        for index, check in enumerate(checks):
            try:
                answer = check(request)
            except Exception:
                return _Walk(self, request, links, counters, index, preparers).take(
                    started,
                    None,
                    Failure(),  # type: ignore[no-untyped-call]
                )
            if answer is not CONTINUE:
                return _Walk(self, request, links, counters, index, preparers).take(started, answer, None)
            now = timer()
            counted = counters[index]
            counted.calls += 1
            counted.seconds += now - started
            started = now
        return succeed(NOTHING)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The counters as plain values (for the control socket and the workers' reports).

        A filter with a ``details()`` method (counts of its own, like clamav's
        viruses by name) has them added under "details".
        """
        snapshot = {name: attrs.asdict(counters) for name, counters in self.counters.items()}
        for links in self.chains.values():
            for link in links:
                details = getattr(link.filter, "details", None)
                if details is not None and link.name in snapshot:
                    snapshot[link.name]["details"] = dict(details())
        return snapshot

    def count(self, link: Link, verdict: Verdict, elapsed: float, *, failed: bool, timed_out: bool) -> None:
        counters = self.counters.get(link.name)
        if counters is None:
            counters = self.counters[link.name] = FilterCounters()
        counters.calls += 1
        counters.seconds += elapsed
        if failed:
            counters.failures += 1
        if timed_out:
            counters.timeouts += 1
        if verdict.action is not Action.CONTINUE:
            key = verdict.action.value
            counters.actions[key] = counters.actions.get(key, 0) + 1


# a stage's links, their counters, its IPrepare links with their places, and the
# links' check methods (looked up once: filters are reloaded in place, never replaced)
_Stage = tuple[
    tuple[Link, ...],
    tuple["FilterCounters", ...],
    tuple[tuple[int, Any], ...],
    tuple[Callable[[Request], Any], ...],
]


class _Deadlines:
    """When the filters that wait time out: one reactor timer per timeout, not one per wait.

    All waits of a link have the link's timeout, so in the queue of one timeout
    the deadlines come in the order the waits began; the reactor's timer is set
    for the first. A wait that ends is only taken out of its queue (and the
    timer cancelled if nothing else waits): a DelayedCall made and cancelled
    for each wait cost the worker about 2 µs a session, and the reactor keeps
    cancelled calls in its heap until it sorts them out.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._queues: dict[float, dict[Any, tuple[float, Deferred[Any]]]] = {}  # timeout -> walk -> ...
        self._timers: dict[float, Any] = {}  # timeout -> the IDelayedCall for its queue's first deadline

    def add(self, walk: Any, timeout: float, answer: Deferred[Any]) -> None:
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = {}
        queue[walk] = (self.clock.seconds() + timeout, answer)
        if timeout not in self._timers:
            self._timers[timeout] = self.clock.callLater(timeout, self._expire, timeout)

    def remove(self, walk: Any, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None and queue.pop(walk, None) is not None and not queue:
            timer = self._timers.pop(timeout, None)  # nothing waits: no timer left behind
            if timer is not None:
                timer.cancel()

    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def _expire(self, timeout: float) -> None:
        del self._timers[timeout]
        queue = self._queues[timeout]
        now = self.clock.seconds()
        expired = []
        for walk, (deadline, answer) in queue.items():
            if deadline > now:
                self._timers[timeout] = self.clock.callLater(deadline - now, self._expire, timeout)
                break
            expired.append((walk, answer))
        for walk, _answer in expired:
            del queue[walk]
        for walk, answer in expired:
            walk._time_out(answer)


class _Walk:
    """One run of one stage: a small state machine over the links."""

    __slots__ = (
        "copies",
        "counters",
        "hits",
        "index",
        "inline",
        "inline_verdict",
        "links",
        "preparers",
        "request",
        "result",
        "runner",
        "started",
        "tags",
        "timed_out",
        "timer",
    )

    def __init__(
        self,
        runner: ChainRunner,
        request: Request,
        links: tuple[Link, ...],
        counters: tuple[FilterCounters, ...],
        index: int = 0,
        preparers: tuple[tuple[int, Any], ...] = (),
    ) -> None:
        self.runner = runner
        self.request = request
        self.links = links
        self.counters = counters  # of each link, in order
        self.index = index  # the link asked last
        self.preparers = preparers  # the stage's IPrepare links, until they are told to start
        self.tags: list[Verdict] = []
        self.copies: list[str] = []
        self.hits: list[Hit] = []
        self.result: Deferred[Outcome] | None = None
        self.started = 0.0
        self.inline = False
        self.inline_verdict: Verdict | None = None
        self.timer: float | None = None  # the timeout of the link that waits (see _Deadlines)
        self.timed_out = False

    def take(self, started: float, answer: object, failure: Failure | None) -> Deferred[Outcome]:
        """Go on from the answer (or the exception) of the link at `index`, asked at `started`."""
        self.started = started
        outcome = self._settle(self.links[self.index], answer, failure)
        if outcome is _NEXT:
            outcome = self._advance()
        if outcome is not None:
            return succeed(outcome)  # type: ignore[arg-type]
        self.result = Deferred()
        return self.result

    def _advance(self) -> Outcome | None:
        """Run links until one waits (None) or the stage is decided (the Outcome)."""
        links = self.links
        request = self.request
        timer = self.runner.timer
        while self.index < len(links):
            link = links[self.index]
            started = self.started = timer()
            try:
                answer = link.filter.check(request)
            except Exception:
                outcome = self._settle(link, None, Failure())  # type: ignore[no-untyped-call]
            else:
                if answer is CONTINUE:
                    # the usual answer, and the cheap path: counted, nothing else to do
                    counters = self.counters[self.index]
                    counters.calls += 1
                    counters.seconds += timer() - started
                    self.index += 1
                    continue
                outcome = self._settle(link, answer, None)
            if outcome is not _NEXT:
                return outcome  # type: ignore[return-value]
        return self._outcome(CONTINUE, None)

    def _settle(self, link: Link, answer: object, failure: Failure | None) -> Outcome | object | None:
        """One link's answer other than CONTINUE: the Outcome, None while it waits, or _NEXT."""
        if failure is not None:
            verdict = self._failed(link, failure, timed_out=False)
        elif isinstance(answer, Deferred):
            self.inline = True  # it may have fired already: then go on here
            answer.addCallbacks(self._answered, self._errored, errbackArgs=(link,))
            self.inline = False
            if self.inline_verdict is None:
                # its deadline (cheaper than Deferred.addTimeout or a callLater each)
                self.timer = link.timeout
                self.runner.deadlines.add(self, link.timeout, answer)
                if self.preparers and self.preparers[-1][0] > self.index:
                    self._prepare_the_rest()
                return None
            verdict, self.inline_verdict = self.inline_verdict, None
        else:
            verdict = self._checked(link, answer, failed=False)
        self.index += 1
        outcome = self._consider(link, verdict)
        return _NEXT if outcome is None else outcome

    def _prepare_the_rest(self) -> None:
        """While this link waits, the links after it that can start their slow work do (IPrepare)."""
        preparers, self.preparers = self.preparers, ()  # once per stage
        request = self.request
        for index, prepared in preparers:
            if index > self.index:
                try:
                    prepared.prepare(request)
                except Exception:
                    log.failure("filter: {name}: prepare failed", name=getattr(prepared, "name", "?"))

    def _time_out(self, answer: Deferred[Any]) -> None:
        self.timer = None
        self.timed_out = True
        answer.cancel()  # its errback (CancelledError) comes to _errored

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.runner.deadlines.remove(self, self.timer)
            self.timer = None

    def _answered(self, answer: object) -> None:
        self._stop_timer()
        if answer is CONTINUE and not self.inline:
            # the usual answer (a client no DNS list names): counted as run() counts it
            counters = self.counters[self.index]
            counters.calls += 1
            counters.seconds += self.runner.timer() - self.started
            self.index += 1
            self._go_on(self._advance())
            return
        link = self.links[self.index]
        self._resume(link, self._checked(link, answer, failed=False))

    def _errored(self, failure: Failure, link: Link) -> None:
        self._stop_timer()
        timed_out, self.timed_out = self.timed_out, False
        self._resume(link, self._failed(link, failure, timed_out=timed_out))

    def _resume(self, link: Link, verdict: Verdict) -> None:
        if self.inline:
            self.inline_verdict = verdict
            return
        self.index += 1
        outcome = self._consider(link, verdict)
        self._go_on(outcome if outcome is not None else self._advance())

    def _go_on(self, outcome: Outcome | None) -> None:
        """After a wait: the stage's Outcome to whoever waits for it, unless a link waits again (None)."""
        if outcome is not None:
            assert self.result is not None
            result, self.result = self.result, None
            result.callback(outcome)

    def _checked(self, link: Link, answer: object, *, failed: bool) -> Verdict:
        if not isinstance(answer, Verdict):
            error = TypeError(f"filter {link.name} returned {answer!r}, not a Verdict")
            return self._failed(link, Failure(error), timed_out=False)  # type: ignore[no-untyped-call]
        elapsed = self.runner.timer() - self.started
        self.runner.count(link, answer, elapsed, failed=failed, timed_out=False)
        if answer.action is not Action.CONTINUE:
            self._hit(link, answer, elapsed, failed=False)
        return answer

    def _failed(self, link: Link, failure: Failure, *, timed_out: bool) -> Verdict:
        elapsed = self.runner.timer() - self.started
        verdict = link.on_failure
        session = self.request.session
        if timed_out:
            log.warn(
                "filter: {name} timed out after {timeout:g} s at {stage} for [{peer}]; acting as {action}",
                name=link.name,
                timeout=link.timeout,
                stage=self.request.stage.value,
                peer=session.peer_host,
                action=verdict.action.value,
            )
        else:
            log.failure(
                "filter: {name} failed at {stage} for [{peer}]; acting as {action}",
                failure,
                name=link.name,
                stage=self.request.stage.value,
                peer=session.peer_host,
                action=verdict.action.value,
            )
        self.runner.count(link, verdict, elapsed, failed=True, timed_out=timed_out)
        self._hit(link, verdict, elapsed, failed=True)
        return verdict

    def _hit(self, link: Link, verdict: Verdict, elapsed: float, *, failed: bool) -> None:
        request = self.request
        recipient = request.recipient.address if request.recipient is not None else None
        hit = Hit(
            link.name,
            request.stage,
            verdict.action,
            verdict.reason,
            verdict.score,
            elapsed,
            recipient,
            failed,
        )
        self.hits.append(hit)
        envelope = request.envelope
        log.info(
            "filter: {name} {action} at {stage} [{peer}]{sender}{rcpt}: {reason}{score} ({ms:.1f} ms)",
            name=link.name,
            action=verdict.action.value + (" (failure verdict)" if failed else ""),
            stage=request.stage.value,
            peer=request.session.peer_host,
            sender=f" from=<{envelope.mail_from}>" if envelope is not None else "",
            rcpt=f" to=<{recipient}>" if recipient is not None else "",
            reason=verdict.reason or "-",
            score=f" score={verdict.score:g}" if verdict.score else "",
            ms=elapsed * 1000,
        )

    def _consider(self, link: Link, verdict: Verdict) -> Outcome | None:
        if verdict.action is Action.TAG or (
            # headers on a verdict that lets the message go on somewhere (a copy, the
            # quarantine, another address) are kept: a released message shows them
            (verdict.headers or verdict.subject_prefix) and verdict.action not in _REFUSALS
        ):
            self.tags.append(verdict)
        if verdict.action is Action.COPY_TO and verdict.target:
            self.copies.append(verdict.target)
        if verdict.action.ends_stage:
            return self._outcome(verdict, link.name)
        return None

    def _outcome(self, verdict: Verdict, decided_by: str | None) -> Outcome:
        if verdict is CONTINUE and not (self.tags or self.copies or self.hits):
            return NOTHING
        return Outcome(verdict, decided_by, tuple(self.tags), tuple(self.copies), tuple(self.hits))


_REFUSALS = frozenset({Action.REJECT, Action.DEFER, Action.DISCARD})
_NEXT = object()  # a link's answer that lets the walk go on to the next link


def check_filter(candidate: object, name: str) -> None:
    """Raise TypeError unless `candidate` looks like a filter (for the registry)."""
    if not IFilter.providedBy(candidate) and not (
        hasattr(candidate, "check") and hasattr(candidate, "stages") and hasattr(candidate, "name")
    ):
        raise TypeError(f"{name} does not provide IFilter (name, stages, check)")
