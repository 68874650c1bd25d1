"""The "limits" filter: connection limits per client and for the gateway, AUTH lockout,
directory-harvest and RSET limits.

At CONNECT it counts the session in the anvil (`gateway.filters.anvil`, shared by
every SMTP process) and answers ``421 4.7.0`` (DEFER) when:

- the gateway has more than ``max_sessions`` sessions open (of the clients it counts);
- the client has more than ``max_connections_per_ip`` sessions open;
- the client opened more than ``max_connection_rate`` in the last ``rate_window``;
- the client's sessions that ended in the last ``error_window`` made at least
  ``error_min`` errors and more than ``error_ratio`` errors per command: a client
  the tarpit (``smtp.soft_error_limit``) slowed down and ``smtp.max_errors``
  disconnected comes back to "too many errors from your address".

When a session ends, its errors and commands go to the anvil and it is counted
down (`ISessionObserver`). At MAIL and RCPT, a session that has issued more
than ``max_rset`` RSETs beyond its messages is cut off (421); at RCPT, a session
with at least ``harvest_min_unknown`` unknown recipients (refused 5.1.1 by
recipient validation) making up more than ``harvest_ratio`` of those it tried
is cut off too: directory harvesting.

As the AUTH guard (`IAuthGuard`, for every listener whatever the chain): each
AUTH failure is counted per client in the anvil and answered after a delay that
doubles with each failure in ``auth_window`` (``auth_delay`` up to
``auth_max_delay``); the ``auth_max_failures``-th locks the client out of AUTH
for ``auth_lockout`` (``454 4.7.0``).

Legitimate internal servers are not its business: the outbound chain normally
does not include "limits", and with ``exempt_relay_networks`` (the default)
clients in ``relay.networks`` are neither counted nor limited, nor locked out of
AUTH, even where it is chained. A limit of 0 is no limit.

When the anvil cannot be asked (a worker that lost the main process), the
connect check fails and the chain runner answers with the filter's failure
verdict: DEFER unless ``on_failure`` says otherwise. An AUTH attempt then gets
``454 4.3.0``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._anvil_table import AnvilTable
from gateway.filters.anvil import HORIZON, Anvil, AnvilNotAsked, AuthState, ClientCounts, IAnvil
from gateway.interfaces import IAuthGuard, IFilter, ISessionObserver
from gateway.model import CONTINUE, Session, Stage, Verdict

log = Logger(namespace="mailgate.filter.limits")

SessionKey = tuple[str, int, str]  # (peer_host, peer_port, listener): one connection
AUTH_MEMORY = 10_000  # clients whose AUTH failure count is kept for the delay


def _key(session: Session) -> SessionKey:
    return (session.peer_host, session.peer_port, session.listener)


def _over(value: int, limit: int) -> bool:
    return limit > 0 and value > limit


def _cut_off(reason: str) -> Verdict:
    """A 421: the client is told to come back later and the session ends."""
    return Verdict.defer(reason, code=421, enhanced="4.7.0")


@attrs.frozen
class LimitsSettings:
    """The [filters.limits] options (documented in etc/mailgate.toml)."""

    max_sessions: int = 2000
    max_connections_per_ip: int = 32
    max_connection_rate: int = 32
    rate_window: float = 60.0
    error_ratio: float = 0.5
    error_min: int = 20
    error_window: float = 600.0
    harvest_min_unknown: int = 5
    harvest_ratio: float = 0.5
    max_rset: int = 20
    auth_max_failures: int = 5
    auth_window: float = 900.0
    auth_lockout: float = 3600.0
    auth_delay: float = 1.0
    auth_max_delay: float = 30.0
    exempt_relay_networks: bool = True

    @classmethod
    def from_options(cls, options: Section) -> LimitsSettings:
        defaults = cls()
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            default = getattr(defaults, field.name)
            if isinstance(default, bool):
                values[field.name] = options.take(field.name, bool, default)
            elif isinstance(default, int):
                values[field.name] = options.take(field.name, int, default)
                if values[field.name] < 0:
                    raise options.error(field.name, f"must be 0 (no limit) or more, not {values[field.name]}")
            elif field.name.endswith("_ratio"):
                values[field.name] = options.take(field.name, float, default)
                if not 0 <= values[field.name] <= 1:
                    raise options.error(field.name, f"must be between 0 and 1, not {values[field.name]}")
            else:
                values[field.name] = options.duration(field.name, default)
        for window in ("rate_window", "error_window", "auth_window"):
            if not 0 < values[window] <= HORIZON:
                raise options.error(window, f"must be more than 0 and at most {HORIZON:g} s (1h)")
        return cls(**values)


@implementer(IFilter, ISessionObserver, IAuthGuard)
class Limits:
    """Connection, error, harvest, RSET and AUTH limits per client (see the module docstring)."""

    name = "limits"
    stages = frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT})

    def __init__(self, settings: LimitsSettings, anvil: IAnvil) -> None:
        self.settings = settings
        self.anvil = anvil
        # an anvil in this process (every SMTP worker's own) is asked straight, with no Deferred
        self._table: AnvilTable | None = anvil.table if type(anvil) is Anvil else None
        self._counted: set[SessionKey] = set()  # sessions the anvil counted up for us
        self._auth_failures: OrderedDict[str, int] = OrderedDict()  # client -> failures known

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Limits:
        return cls(LimitsSettings.from_options(options), services.anvil)

    def _exempt(self, session: Session) -> bool:
        # may_relay before AUTH means relay.networks: the internal servers
        return (
            self.settings.exempt_relay_networks and session.may_relay and session.authenticated_user is None
        )

    # --- IFilter ---------------------------------------------------------------------

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        session = request.session
        if session.may_relay and self.settings.exempt_relay_networks and session.authenticated_user is None:
            return CONTINUE  # see _exempt
        stage = request.stage
        if stage is Stage.CONNECT:
            return self._connect(session)
        verdict = self._rsets(request)
        if verdict is None and stage is Stage.RCPT:
            verdict = self._harvest(request)
        return verdict or CONTINUE

    def _connect(self, session: Session) -> Verdict | Deferred[Verdict]:
        settings = self.settings
        key = _key(session)
        if self._table is not None:
            self._counted.add(key)
            counts = self._table.connect(session.peer_host, settings.rate_window, settings.error_window)
            return self._judge(counts, session)
        # Counted from now: a session that ends while we wait is counted down after
        # this, and one whose answer failed or came too late for the chain may still
        # have been counted. That is safe over the socket: the anvil counts down only
        # what the same connection counted up (and a lost connection's sessions itself).
        self._counted.add(key)
        asked = self.anvil.connect(session.peer_host, settings.rate_window, settings.error_window)

        def unanswered(failure: Failure) -> Failure:
            if isinstance(failure.value, AnvilNotAsked):
                self._counted.discard(key)  # nothing was counted: nothing to count down
            return failure

        return asked.addCallbacks(self._judge, unanswered, callbackArgs=(session,))

    def _judge(self, counts: ClientCounts, session: Session) -> Verdict:
        settings = self.settings
        client = session.peer_host
        # _over(value, limit), written out: this runs for every new connection
        limit = settings.max_connections_per_ip
        if limit > 0 and counts.concurrent > limit:
            return _cut_off(f"Error: too many connections from [{client}], try again later")
        limit = settings.max_connection_rate
        if limit > 0 and counts.rate > limit:
            return _cut_off(
                f"Error: too many connections from [{client}] in {settings.rate_window:g} s, try again later"
            )
        if (
            counts.errors
            and settings.error_min > 0
            and counts.errors >= settings.error_min
            and counts.errors > settings.error_ratio * counts.commands
        ):
            return _cut_off(f"Error: too many errors from your address [{client}], try again later")
        limit = settings.max_sessions
        if limit > 0 and counts.sessions > limit:
            return _cut_off("Error: too many connections, try again later")
        return CONTINUE

    def _rsets(self, request: Request) -> Verdict | None:
        counts = request.counts
        # clients that reuse a session (Postfix, our own SMTP client) RSET before each message
        beyond = counts.get("rset", 0) - counts.get("messages", 0)
        limit = self.settings.max_rset
        if limit > 0 and beyond > limit:  # _over
            return _cut_off(f"Error: too many RSET commands from [{request.session.peer_host}]")
        return None

    def _harvest(self, request: Request) -> Verdict | None:
        settings = self.settings
        unknown = request.counts.get("unknown_recipients", 0)
        tried = unknown + request.counts.get("recipients", 0)
        if (
            settings.harvest_min_unknown > 0
            and unknown >= settings.harvest_min_unknown
            and unknown > settings.harvest_ratio * tried
        ):
            return _cut_off(
                f"Error: too many unknown recipients from [{request.session.peer_host}], try again later"
            )
        return None

    # --- ISessionObserver ------------------------------------------------------------

    def session_closed(self, session: Session, counts: dict[str, int]) -> None:
        key = _key(session)
        if key not in self._counted:
            return
        self._counted.discard(key)
        if self._table is not None:
            self._table.disconnect(session.peer_host, counts.get("errors", 0), counts.get("commands", 0))
            return
        told = self.anvil.disconnect(session.peer_host, counts.get("errors", 0), counts.get("commands", 0))
        told.addErrback(self._not_told, session)

    def _not_told(self, failure: Failure, session: Session) -> None:
        # the anvil counted the session down itself when it lost the worker's connection
        log.debug(
            "anvil not told of the end of [{peer}]:{port}: {error}",
            peer=session.peer_host,
            port=session.peer_port,
            error=failure.getErrorMessage(),
        )

    # --- IAuthGuard ------------------------------------------------------------------

    def auth_allowed(self, session: Session) -> Verdict | Deferred[Verdict]:
        settings = self.settings
        if self._exempt(session) or settings.auth_max_failures == 0:
            return CONTINUE
        client = session.peer_host

        def judged(state: AuthState) -> Verdict:
            self._remember(client, state.failures)
            if state.locked_for > 0:
                log.info(
                    "AUTH refused to [{peer}]: locked out for {left:.0f} s more after {failures} failure(s)",
                    peer=client,
                    left=state.locked_for,
                    failures=state.failures,
                )
                return Verdict.defer(
                    f"Error: too many AUTH failures from [{client}], try again later", 454, "4.7.0"
                )
            return CONTINUE

        def unanswered(failure: Failure) -> Verdict:
            log.warn("AUTH for [{peer}]: {error}", peer=client, error=failure.getErrorMessage())
            return Verdict.defer("Temporary authentication failure, try again later", 454, "4.3.0")

        return self.anvil.auth_status(client, settings.auth_window).addCallbacks(judged, unanswered)

    def auth_result(self, session: Session, user: str, success: bool) -> float:
        settings = self.settings
        if success or self._exempt(session) or settings.auth_max_failures == 0:
            return 0.0
        client = session.peer_host
        failures = self._auth_failures.get(client, 0) + 1  # until the anvil says better
        self._remember(client, failures)
        counted = self.anvil.auth_failed(
            client, settings.auth_window, settings.auth_max_failures, settings.auth_lockout
        )

        def noted(state: AuthState) -> None:
            self._remember(client, state.failures)
            if state.failures == settings.auth_max_failures:
                log.warn(
                    "[{peer}] locked out of AUTH for {lockout:g} s after {failures} failures",
                    peer=client,
                    lockout=settings.auth_lockout,
                    failures=state.failures,
                )

        counted.addCallbacks(noted, lambda failure: self._not_told(failure, session))
        delay: float = settings.auth_delay * 2.0 ** min(failures - 1, 32)
        return min(delay, settings.auth_max_delay)

    def _remember(self, client: str, failures: int) -> None:
        self._auth_failures[client] = failures
        self._auth_failures.move_to_end(client)
        if len(self._auth_failures) > AUTH_MEMORY:
            self._auth_failures.popitem(last=False)
