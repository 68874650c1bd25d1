"""AutoWhitelist ("auto-whitelist"): senders with a clean record skip the content filters.

A sender is its envelope address plus the client's network (a /24 for IPv4, a
/64 for IPv6), so a forged address from elsewhere is a stranger. Each message
the gateway queues from it is judged when it is queued (IAcceptObserver):

- clean: not held, and no filter tagged, held, rejected or discarded any part of
  it or gave it a positive score. After `clean_messages` clean messages within
  `max_age` the sender is whitelisted for `max_age`; each later clean message
  renews that.
- not clean: the count and any whitelisting are forgotten; it starts again.
- a filter failed on it: it was not really checked, so it counts neither way.

The null sender (bounces) is never whitelisted.

At the DATA stage a whitelisted sender gets ACCEPT, which ends the DATA stage:
the filters after this one in the chain (the content layer: virus and spam
scanners) are skipped for it. Put it after the cheap DATA checks you always
want and before the content scanners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._keys import chain_directions, client_network, prefixes, sender_key
from gateway.filters.chain import Hit
from gateway.interfaces import IAcceptObserver, IFilter
from gateway.model import CONTINUE, Action, Direction, Session, Stage, Verdict
from gateway.state import IStateStore

log = Logger(namespace="mailgate.filter.auto-whitelist")

TABLE = "auto-whitelist"
# what a filter may do to a message that says it was not clean
_DIRTY = frozenset({Action.TAG, Action.QUARANTINE, Action.REJECT, Action.DISCARD})


def judge(hits: Iterable[Hit], held: bool) -> bool | None:
    """True for a clean message, False for one that was not, None when a filter failed on it."""
    hits = tuple(hits)
    if held or any(hit.score > 0 or hit.action in _DIRTY for hit in hits if not hit.failed):
        return False
    if any(hit.failed for hit in hits):
        return None
    return True


@implementer(IFilter, IAcceptObserver)
class AutoWhitelist:
    """Whitelists senders (address + client network) after N clean messages (module docstring)."""

    name = "auto-whitelist"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        store: Callable[[], IStateStore],
        clock: Any,
        *,
        clean_messages: int = 3,
        max_age: float = 30 * 86400,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
        directions: frozenset[Direction] = frozenset(Direction),
    ) -> None:
        self._store = store
        self.clock = clock
        self.clean_messages = clean_messages
        self.max_age = max_age
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.directions = directions

    @property
    def store(self) -> IStateStore:
        """The state store (`store` is called each time: FilterServices opens it once)."""
        return self._store()

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> AutoWhitelist:
        clean_messages = options.positive("clean_messages", 3)
        max_age = options.positive_duration("max_age", 30 * 86400)
        ipv4_prefix, ipv6_prefix = prefixes(options)
        return cls(
            lambda: services.store,  # opened at the first check, not when the chain is built
            services.reactor,
            clean_messages=clean_messages,
            max_age=max_age,
            ipv4_prefix=ipv4_prefix,
            ipv6_prefix=ipv6_prefix,
            directions=chain_directions(options, services),
        )

    def key(self, session: Session, sender: str) -> str:
        return f"{client_network(session.peer_host, self.ipv4_prefix, self.ipv6_prefix)} {sender_key(sender)}"

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        envelope = request.envelope
        if envelope is None or not envelope.mail_from:
            return CONTINUE
        network = client_network(request.session.peer_host, self.ipv4_prefix, self.ipv6_prefix)

        def decide(entry: Any) -> Verdict:
            if entry is None:
                return CONTINUE
            return Verdict(Action.ACCEPT, f"auto-whitelisted: <{envelope.mail_from}> from {network}")

        found: Deferred[Any] = self.store.get(TABLE, self.key(request.session, envelope.mail_from))
        return found.addCallback(decide)

    def message_accepted(self, request: Request, hits: Any, held: bool) -> None:
        self._record(request, tuple(hits), held)

    def message_refused(self, request: Request, hits: Any) -> None:
        """A message not queued after the DATA stage (a later filter rejected, discarded or deferred it).

        A REJECT or DISCARD hit makes it not clean: the sender starts again. A
        message that was not queued never counts as clean (a 4xx says nothing).
        (The reception calls this once it tells observers of refused messages.)
        """
        if judge(tuple(hits), False) is False:
            self._record(request, tuple(hits), False)

    def _record(self, request: Request, hits: tuple[Hit, ...], held: bool) -> None:
        envelope = request.envelope
        if request.direction not in self.directions or envelope is None or not envelope.mail_from:
            return
        clean = judge(hits, held)
        if clean is None:
            return
        key = self.key(request.session, envelope.mail_from)
        done: Deferred[Any]
        if not clean:
            done = self.store.delete(TABLE, key)
        else:
            whitelisted = any(hit.filter == self.name and hit.action is Action.ACCEPT for hit in hits)
            done = self.store.increment(TABLE, key, 1, self.max_age)
            done.addCallback(self._counted, key, whitelisted)
        done.addErrback(self._failed, key)

    def _counted(self, total: int, key: str, whitelisted: bool) -> Deferred[None] | None:
        if not whitelisted and total < self.clean_messages:
            return None
        if not whitelisted and total == self.clean_messages:
            network, _, sender = key.partition(" ")
            log.info(
                "auto-whitelist: <{sender}> from {network} whitelisted after {count} clean messages",
                sender=sender,
                network=network,
                count=total,
            )
        # (re)new the whitelisting: it lasts max_age from the last clean message
        return self.store.put(TABLE, key, {"renewed": self.clock.seconds(), "clean": total}, self.max_age)

    def _failed(self, failure: Failure, key: str) -> None:
        log.warn(
            "auto-whitelist: cannot record the message of {key}: {error}",
            key=key,
            error=failure.getErrorMessage(),
        )
