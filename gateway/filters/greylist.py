"""Greylist ("greylist"): the first attempt of an unknown triplet is told to come back later.

Off by default (in no chain until the administrator adds it to one). At RCPT,
the triplet (client network, sender, recipient) is looked up, as postgrey does:

- never seen, or last seen more than `retry_window` ago: it is remembered and
  deferred, ``450 4.7.1 Greylisted, please try again in 300 seconds``;
- seen, but less than `delay` ago: deferred again, for the time left;
- seen at least `delay` ago (a real mail server retried): it passes, and the
  triplet is remembered as passing for `max_age` (renewed while it is used).

A client network with `auto_whitelist_clients` passed triplets is not greylisted
any more for `max_age` (postgrey's --auto-whitelist-clients): a server that
retries once will retry again. Senders are compared without what changes on each
attempt (BATV tags, digits in VERP bounce addresses).

A store that fails fails the check: the chain runner answers with the failure
verdict (a 4xx by default), never letting a triplet through unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.filters._keys import client_network, prefixes, sender_key, stable_sender
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, Stage, Verdict
from gateway.state import IStateStore

log = Logger(namespace="mailgate.filter.greylist")

TRIPLETS = "greylist"
CLIENTS = "greylist.clients"
RENEW_AFTER = 86400.0  # a known triplet or client is written back at most once a day


@implementer(IFilter)
class Greylist:
    """Defers the first delivery attempt of each new (network, sender, recipient) (module docstring)."""

    name = "greylist"
    stages = frozenset({Stage.RCPT})

    def __init__(
        self,
        store: Callable[[], IStateStore],
        clock: Any,
        *,
        delay: float = 300.0,
        retry_window: float = 2 * 86400,
        max_age: float = 35 * 86400,
        auto_whitelist_clients: int = 1,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
    ) -> None:
        self._store = store
        self.clock = clock
        self.delay = delay
        self.retry_window = retry_window
        self.max_age = max_age
        self.auto_whitelist_clients = auto_whitelist_clients
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix

    @property
    def store(self) -> IStateStore:
        """The state store (`store` is called each time: FilterServices opens it once)."""
        return self._store()

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Greylist:
        delay = options.duration("delay", 300)
        retry_window = options.duration("retry_window", 2 * 86400)
        if retry_window <= delay:
            raise options.error("retry_window", f"must be longer than delay ({delay:g} s)")
        max_age = options.positive_duration("max_age", 35 * 86400)
        auto_whitelist_clients = options.take("auto_whitelist_clients", int, 1)
        if auto_whitelist_clients < 0:
            raise options.error("auto_whitelist_clients", "must be 0 (never) or more")
        ipv4_prefix, ipv6_prefix = prefixes(options)
        return cls(
            lambda: services.store,  # opened at the first check, not when the chain is built
            services.reactor,
            delay=delay,
            retry_window=retry_window,
            max_age=max_age,
            auto_whitelist_clients=auto_whitelist_clients,
            ipv4_prefix=ipv4_prefix,
            ipv6_prefix=ipv6_prefix,
        )

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        envelope, recipient = request.envelope, request.recipient
        if envelope is None or recipient is None:
            return CONTINUE
        network = client_network(request.session.peer_host, self.ipv4_prefix, self.ipv6_prefix)
        triplet = f"{network} {stable_sender(envelope.mail_from)} {sender_key(recipient.address)}"
        now = self.clock.seconds()

        def client_known(entry: Any) -> Verdict | Deferred[Verdict]:
            if entry is None:
                found: Deferred[Any] = self.store.get(TRIPLETS, triplet)
                return found.addCallback(self._decide, triplet, network, now)
            if now - entry.get("seen", 0) > RENEW_AFTER:
                renewed: Deferred[None] = self.store.put(
                    CLIENTS, network, {**entry, "seen": now}, self.max_age
                )
                return renewed.addCallback(lambda _: CONTINUE)
            return CONTINUE

        if not self.auto_whitelist_clients:
            return client_known(None)
        known: Deferred[Any] = self.store.get(CLIENTS, network)
        return known.addCallback(client_known)

    def _decide(self, entry: Any, triplet: str, network: str, now: float) -> Verdict | Deferred[Verdict]:
        if entry is None:  # new, or its retry window has passed
            remembered: Deferred[None] = self.store.put(TRIPLETS, triplet, {"first": now}, self.retry_window)
            return remembered.addCallback(lambda _: self._greylisted(self.delay))
        first = float(entry["first"])
        if entry.get("passed"):
            if now - entry.get("seen", first) > RENEW_AFTER:
                renewed: Deferred[None] = self.store.put(
                    TRIPLETS, triplet, {**entry, "seen": now}, self.max_age
                )
                return renewed.addCallback(lambda _: CONTINUE)
            return CONTINUE
        waited = now - first
        if waited < self.delay:
            return self._greylisted(self.delay - waited)
        log.info("greylist: {triplet} passed after {waited:.0f} s", triplet=triplet, waited=waited)
        passed: Deferred[Any] = self.store.put(
            TRIPLETS, triplet, {"first": first, "passed": True, "seen": now}, self.max_age
        )
        if self.auto_whitelist_clients:
            passed.addCallback(lambda _: self.store.increment(CLIENTS, network, 1, self.max_age))
            passed.addCallback(self._count_client, network, now)
        return passed.addCallback(lambda _: CONTINUE)

    def _count_client(self, passes: int, network: str, now: float) -> Deferred[None] | None:
        if passes < self.auto_whitelist_clients:
            return None
        if passes == self.auto_whitelist_clients:
            log.info(
                "greylist: client network {network} retries properly ({passes} passed): not greylisted for "
                "{days:g} days",
                network=network,
                passes=passes,
                days=self.max_age / 86400,
            )
        return self.store.put(CLIENTS, network, {"since": now, "seen": now}, self.max_age)

    def _greylisted(self, remaining: float) -> Verdict:
        seconds = max(1, math.ceil(remaining))
        return Verdict.defer(f"Greylisted, please try again in {seconds} seconds", 450, "4.7.1")
