"""The "protocol" filter: clients that do not speak SMTP the way mail servers do.

Layer 2 of the defences, after postscreen(8) and smtpd's restrictions:

- **Pregreet (early talkers).** At CONNECT the banner waits ``greet_wait``
  seconds (the check answers CONTINUE after the wait). Spam engines talk
  without waiting for it; the SMTP server notes a client that sends anything
  before the banner (`Session.pregreet`), and at HELO and MAIL this filter
  refuses it (``pregreet_action``: "reject" is ``554 5.5.1 Protocol error:
  talked before the greeting``; "drop" is a 421 and the end of the session;
  "tag" only marks its messages). A client that waited and then said HELO
  properly passes, and skips the wait for ``pass_ttl`` (postscreen's cache):
  real mail servers wait once. The pass cache is in memory, at most
  ``pass_cache_size`` clients, one per process: with ``smtp.workers`` a client
  may wait once per worker.
- **Improper pipelining.** A client that sends commands ahead before we offered
  PIPELINING (before the EHLO reply; `Session.improper_pipelining`, noted by the
  server) is refused at MAIL (``improper_pipelining_action``; "reject" is
  Postfix's ``503 5.5.0 Improper use of SMTP command pipelining``).
- **Null sender.** A bounce (``MAIL FROM:<>``) goes to one recipient (RFC 3464:
  the sender of the message that failed). A second RCPT in such a transaction
  gets ``multi_recipient_bounce``: "defer" (the default) answers
  ``452 4.5.3``, which tells a real MTA to send the other recipients in
  another transaction (RFC 5321 4.5.3.1.10), so a legitimate odd bounce is
  never lost while backscatter to lists of addresses is cut to one recipient
  per transaction; "reject" answers ``550 5.5.3`` as Postfix's
  reject_multi_recipient_bounce does. On the outbound chain
  ``outbound_null_sender`` may refuse ``<>`` from authenticated users (a
  person's mail program never sends bounces; internal servers do) or from
  everyone.

Non-SMTP commands (an HTTP proxy probe's ``GET``, ``POST``, ``CONNECT``...) are
cut off by the SMTP server itself with a 421 before any filter is asked.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.interfaces import IFilter, ISessionObserver
from gateway.model import CONTINUE, Action, Direction, Session, Stage, Verdict

log = Logger(namespace="mailgate.filter.protocol")

SessionKey = tuple[str, int, str]  # (peer_host, peer_port, listener): one connection

ACTIONS = ("reject", "drop", "tag")
BOUNCE_ACTIONS = ("defer", "reject", "accept")
OUTBOUND_NULL_SENDER = ("accept", "reject-authenticated", "reject")
HEADER = "X-Mailgate-Protocol"


def _key(session: Session) -> SessionKey:
    return (session.peer_host, session.peer_port, session.listener)


class PassCache:
    """Clients that passed the pregreet test, until their entry expires; bounded.

    Entries all live `ttl` seconds, so the oldest is also the first to expire:
    an ordered dict, trimmed from the front.
    """

    def __init__(self, clock: IReactorTime, ttl: float, size: int) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._expires: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expires)

    def holds(self, client: str) -> bool:
        """Whether `client` passed and its entry has not expired."""
        expires = self._expires.get(client)
        if expires is None:
            return False
        if expires <= self.clock.seconds():
            del self._expires[client]
            return False
        return True

    def add(self, client: str) -> None:
        now = self.clock.seconds()
        self._expires.pop(client, None)
        self._expires[client] = now + self.ttl
        while self._expires:
            oldest, expires = next(iter(self._expires.items()))
            if expires > now and len(self._expires) <= self.size:
                break
            del self._expires[oldest]

    def forget(self, client: str) -> None:
        self._expires.pop(client, None)


def _misbehaved(action: str, reason: str, code: int, enhanced: str, tag: str) -> Verdict:
    if action == "drop":
        return Verdict.defer(reason, code=421, enhanced="4.7.0")
    if action == "tag":
        return Verdict(Action.TAG, reason, headers=((HEADER, tag),))
    return Verdict.reject(reason, code=code, enhanced=enhanced)


@implementer(IFilter, ISessionObserver)
class Protocol:
    """Pregreet, improper pipelining and null-sender rules (see the module docstring)."""

    name = "protocol"
    stages = frozenset({Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT})

    def __init__(
        self,
        clock: IReactorTime,
        *,
        greet_wait: float = 6.0,
        pass_ttl: float = 86400.0,
        pass_cache_size: int = 100_000,
        pregreet_action: str = "reject",
        improper_pipelining_action: str = "reject",
        multi_recipient_bounce: str = "defer",
        outbound_null_sender: str = "accept",
    ) -> None:
        self.clock = clock
        self.greet_wait = greet_wait
        self.passed = PassCache(clock, pass_ttl, pass_cache_size)
        self.pregreet_action = pregreet_action
        self.improper_pipelining_action = improper_pipelining_action
        self.multi_recipient_bounce = multi_recipient_bounce
        self.outbound_null_sender = outbound_null_sender
        self._waited: set[SessionKey] = set()  # sessions that waited, until they pass or end
        # only the stages with something to check: no greet wait, nothing at CONNECT (and no
        # session to forget at its end); bounces to several recipients allowed, nothing at RCPT
        stages = {Stage.HELO, Stage.MAIL}
        if greet_wait > 0:
            stages.add(Stage.CONNECT)
        if multi_recipient_bounce != "accept":
            stages.add(Stage.RCPT)
        self.stages = frozenset(stages)

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Protocol:
        greet_wait = options.duration("greet_wait", 6.0)
        timeout = _timeout_of(options, services)
        if timeout is not None and greet_wait >= timeout:
            raise options.error(
                "greet_wait",
                f"must be shorter than the filter's timeout ({timeout:g} s), or every client would be "
                "refused with its failure verdict; raise timeout in this table",
            )
        return cls(
            services.reactor,
            greet_wait=greet_wait,
            pass_ttl=options.duration("pass_ttl", 86400.0),
            pass_cache_size=options.positive("pass_cache_size", 100_000),
            pregreet_action=options.choice("pregreet_action", ACTIONS, "reject"),
            improper_pipelining_action=options.choice("improper_pipelining_action", ACTIONS, "reject"),
            multi_recipient_bounce=options.choice("multi_recipient_bounce", BOUNCE_ACTIONS, "defer"),
            outbound_null_sender=options.choice("outbound_null_sender", OUTBOUND_NULL_SENDER, "accept"),
        )

    # --- IFilter ---------------------------------------------------------------------

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        stage = request.stage
        if stage is Stage.CONNECT:
            return self._connect(request.session)
        if stage is Stage.HELO:
            return self._helo(request.session)
        if stage is Stage.MAIL:
            return self._mail(request)
        if stage is Stage.RCPT:
            return self._rcpt(request)
        return CONTINUE

    def _connect(self, session: Session) -> Verdict | Deferred[Verdict]:
        if self.greet_wait <= 0 or self.passed.holds(session.peer_host):
            return CONTINUE
        self._waited.add(_key(session))
        return deferLater(self.clock, self.greet_wait, lambda: CONTINUE)

    def _pregreet(self, session: Session) -> Verdict:
        self.passed.forget(session.peer_host)
        self._waited.discard(_key(session))
        return _misbehaved(
            self.pregreet_action, "Protocol error: talked before the greeting", 554, "5.5.1", "pregreet"
        )

    def _helo(self, session: Session) -> Verdict:
        if session.pregreet:
            verdict = self._pregreet(session)
            return CONTINUE if verdict.action is Action.TAG else verdict  # tagged at MAIL
        if self._waited:  # (empty without a greet wait)
            key = _key(session)
            if key in self._waited:
                self._waited.discard(key)
                self.passed.add(session.peer_host)  # it waited for the banner: a real MTA
        return CONTINUE

    def _mail(self, request: Request) -> Verdict:
        session = request.session
        if session.pregreet:
            return self._pregreet(session)
        if session.improper_pipelining:
            return _misbehaved(
                self.improper_pipelining_action,
                "Improper use of SMTP command pipelining",
                503,
                "5.5.0",
                "improper-pipelining",
            )
        envelope = request.envelope
        if (
            envelope is not None
            and envelope.mail_from == ""
            and request.direction is Direction.OUTBOUND
            and (
                self.outbound_null_sender == "reject"
                or (self.outbound_null_sender == "reject-authenticated" and session.authenticated_user)
            )
        ):
            return Verdict.reject("Error: the null sender <> is not accepted from you", 550, "5.7.1")
        return CONTINUE

    def _rcpt(self, request: Request) -> Verdict:
        envelope = request.envelope
        if envelope is None or envelope.mail_from != "" or not envelope.rcpt_to:
            return CONTINUE
        if self.multi_recipient_bounce == "defer":
            return Verdict.defer(
                "Error: a bounce (MAIL FROM:<>) has one recipient; send the others separately",
                452,
                "4.5.3",
            )
        if self.multi_recipient_bounce == "reject":
            return Verdict.reject("Error: multi-recipient bounce", 550, "5.5.3")
        return CONTINUE

    # --- ISessionObserver ------------------------------------------------------------

    def session_closed(self, session: Session, counts: dict[str, int]) -> None:
        if self._waited:
            self._waited.discard(_key(session))


def _timeout_of(options: Section, services: FilterServices) -> float | None:
    """This instance's chain timeout (the registry takes the key out of `options` first)."""
    config = services.config
    filters = getattr(config, "filters", None)
    if filters is None or not options.path.startswith("filters."):
        return None
    name = options.path[len("filters.") :]
    timeout: float = filters.section(config.source, name).duration("timeout", filters.timeout)
    return timeout
