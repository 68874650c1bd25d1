"""Quota ("quota"): per-sender send quotas for outbound mail, to contain a compromised account.

Each sender may send `messages` messages and `recipients` recipients per
`period` (200 and 1,000 an hour by default). The sender is, as `key` says, the
envelope sender address, the authenticated user, or the client's IP address
(an unauthenticated session, or the null sender, falls back to the client IP).

Messages are counted once queued (IAcceptObserver), in the state store's
windowed counters, so every SMTP process adds to the same count; a period
starts at the sender's first message and the count starts again after it. The
check is at MAIL (messages so far) and at RCPT (recipients so far, with those
of the envelope being built). Several sessions at the very same moment may each
pass at the limit: the quota is a tripwire, not an exact meter.

On excess (`action`):

- "hold" (the default): QUARANTINE. The message is accepted into the queue's
  hold state, delivered only when an operator releases it
  (``mailgatectl queue release ID``) or deleted (``mailgatectl queue delete ID``);
- "defer": 450 4.7.1 at MAIL, 452 4.5.3 at RCPT; the sender's server retries.

Either way one line is logged at warning level, once per sender per period:
``ALERT: send quota exceeded by sender=<x> (201 messages in 1h, limit 200):
holding its mail (a compromised account?)``.

QUARANTINE ends the stage: put "quota" last in the outbound chain, so the
filters after it at MAIL and RCPT are not skipped for a held message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._keys import chain_directions, sender_key
from gateway.interfaces import IAcceptObserver, IFilter
from gateway.model import CONTINUE, Action, Direction, Envelope, Session, Stage, Verdict
from gateway.state import IStateStore

log = Logger(namespace="mailgate.filter.quota")

MESSAGES = "quota.messages"
RECIPIENTS = "quota.recipients"
ALERTS = "quota.alerts"
KEYS = ("sender", "user", "client")
ACTIONS = ("hold", "defer")


def period_text(seconds: float) -> str:
    """A period the way the config writes it: "1h", "30m", "1d", "90s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@implementer(IFilter, IAcceptObserver)
class Quota:
    """Holds (or defers) the mail of a sender past its quota, with one alert a period."""

    name = "quota"
    stages = frozenset({Stage.MAIL, Stage.RCPT})

    def __init__(
        self,
        store: Callable[[], IStateStore],
        clock: Any,
        *,
        messages: int = 200,
        recipients: int = 1000,
        period: float = 3600.0,
        key: str = "sender",
        action: str = "hold",
        exempt: frozenset[str] = frozenset(),
        directions: frozenset[Direction] = frozenset(Direction),
    ) -> None:
        self._store = store
        self.clock = clock
        self.messages = messages
        self.recipients = recipients
        self.period = period
        self.by = key
        self.action = action
        self.exempt = frozenset(entry.lower() for entry in exempt)
        self.directions = directions

    @property
    def store(self) -> IStateStore:
        """The state store (`store` is called each time: FilterServices opens it once)."""
        return self._store()

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Quota:
        messages = options.take("messages", int, 200)
        if messages < 0:
            raise options.error("messages", "must be 0 (no limit) or more")
        recipients = options.take("recipients", int, 1000)
        if recipients < 0:
            raise options.error("recipients", "must be 0 (no limit) or more")
        period = options.positive_duration("period", 3600)
        return cls(
            lambda: services.store,  # opened at the first check, not when the chain is built
            services.reactor,
            messages=messages,
            recipients=recipients,
            period=period,
            key=options.choice("key", KEYS, "sender"),
            action=options.choice("action", ACTIONS, "hold"),
            exempt=frozenset(options.strings("exempt")),
            directions=chain_directions(options, services),
        )

    def key(self, session: Session, envelope: Envelope) -> str | None:
        """Whose quota this mail counts against ("sender=<a@b>", "user=alice", "client=[ip]").

        None when that sender is exempt.
        """
        if self.by == "user" and session.authenticated_user:
            user = session.authenticated_user
            return None if user.lower() in self.exempt else f"user={user}"
        if self.by == "sender" and envelope.mail_from:
            sender = sender_key(envelope.mail_from)
            return None if sender in self.exempt else f"sender=<{sender}>"
        return None if session.peer_host.lower() in self.exempt else f"client=[{session.peer_host}]"

    # --- the check -----------------------------------------------------------------

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        envelope = request.envelope
        if envelope is None:
            return CONTINUE
        key = self.key(request.session, envelope)
        if key is None:
            return CONTINUE
        if request.stage is Stage.MAIL and self.messages:
            sent: Deferred[int] = self.store.count(MESSAGES, key)
            return sent.addCallback(self._judge, key, "messages", 1, self.messages, request.stage)
        if request.stage is Stage.RCPT and self.recipients:
            # this recipient and those already in the envelope, on top of what was sent
            pending = len(envelope.rcpt_to) + 1
            counted: Deferred[int] = self.store.count(RECIPIENTS, key)
            return counted.addCallback(
                self._judge, key, "recipients", pending, self.recipients, request.stage
            )
        return CONTINUE

    def _judge(
        self, sent: int, key: str, what: str, adding: int, limit: int, stage: Stage
    ) -> Verdict | Deferred[Verdict]:
        total = sent + adding
        if total <= limit:
            return CONTINUE
        period = period_text(self.period)
        if self.action == "hold":
            verdict = Verdict(Action.QUARANTINE, f"send quota exceeded by {key}: {limit} {what} per {period}")
        elif stage is Stage.RCPT:
            verdict = Verdict.defer(
                f"Too many recipients: send quota of {limit} per {period} reached", 452, "4.5.3"
            )
        else:
            verdict = Verdict.defer(
                f"Send quota of {limit} messages per {period} reached, try again later", 450
            )
        first: Deferred[bool] = self.store.add(ALERTS, key, self.clock.seconds(), self.period)
        first.addCallback(self._alert, key, what, total, limit, period)
        first.addErrback(self._alert_failed, key)
        return first.addCallback(lambda _: verdict)

    def _alert(self, first: bool, key: str, what: str, total: int, limit: int, period: str) -> None:
        if not first:
            return  # said once this period (by this process or another)
        doing = "holding" if self.action == "hold" else "deferring"
        log.warn(
            "ALERT: send quota exceeded by {key} ({total} {what} in {period}, limit {limit}): "
            "{doing} its mail (a compromised account?)",
            key=key,
            total=total,
            what=what,
            period=period,
            limit=limit,
            doing=doing,
        )

    def _alert_failed(self, failure: Failure, key: str) -> None:
        # the verdict stands without the alert; say why there was none
        log.warn(
            "ALERT: send quota exceeded by {key}, and the state store failed: {error}",
            key=key,
            error=failure.getErrorMessage(),
        )

    # --- counting ------------------------------------------------------------------

    def message_accepted(self, request: Request, hits: Any, held: bool) -> None:
        envelope = request.envelope
        if request.direction not in self.directions or envelope is None:
            return
        key = self.key(request.session, envelope)
        if key is None:
            return
        counted: list[Deferred[int]] = []
        if self.messages:
            counted.append(self.store.increment(MESSAGES, key, 1, self.period))
        if self.recipients and envelope.rcpt_to:
            counted.append(self.store.increment(RECIPIENTS, key, len(envelope.rcpt_to), self.period))
        for deferred in counted:
            deferred.addErrback(self._count_failed, key)

    def _count_failed(self, failure: Failure, key: str) -> None:
        log.warn("quota: cannot count a message of {key}: {error}", key=key, error=failure.getErrorMessage())
