"""The anvil's table: counts per client in one-second buckets, bounded in memory.

`gateway.filters.anvil` puts it behind a Deferred API, in this process or on a
UNIX socket for the SMTP workers; this module only counts.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

HORIZON = 3600.0  # seconds: the longest window the anvil remembers events for
MAX_CLIENTS = 100_000
SWEEP_INTERVAL = 60.0


@attrs.define
class ClientCounts:
    """What the anvil knows about a client when it connects (this connection included).

    Not frozen, though nobody changes one: one is made for every new connection,
    and a frozen attrs class takes three times as long to make.
    """

    concurrent: int  # the client's sessions open now
    sessions: int  # everyone's sessions open now
    rate: int  # the client's connections in the rate window
    errors: int  # errors in the client's sessions that ended in the error window
    commands: int  # commands in those sessions


@attrs.frozen
class AuthState:
    """A client's recent AUTH failures, and whether it is locked out."""

    failures: int  # in the window asked about
    locked_for: float = 0.0  # seconds of lockout left; 0 when not locked out


class _Client:
    """One client's counts. Buckets are [second, n] (or [second, errors, commands]), oldest first.

    Plain lists: a table holds up to 100,000 clients, and a deque is 760 bytes
    even when empty (a list, 56); the lists are short (a bucket per second with
    events, inside the longest window), so trimming their front is cheap.
    """

    __slots__ = ("auth_failures", "concurrent", "connects", "locked_until", "sessions")

    def __init__(self) -> None:
        self.concurrent = 0
        self.connects: list[list[int]] = []
        self.sessions: list[list[int]] = []
        self.auth_failures: list[list[int]] = []
        self.locked_until = 0.0


def _add(buckets: list[list[int]], second: int, *amounts: int) -> None:
    if buckets and buckets[-1][0] == second:
        last = buckets[-1]
        for index, amount in enumerate(amounts, 1):
            last[index] += amount
    else:
        buckets.append([second, *amounts])


def _trim(buckets: list[list[int]], oldest: float) -> None:
    drop = 0
    for bucket in buckets:
        if bucket[0] >= oldest:
            break
        drop += 1
    if drop:
        del buckets[:drop]


def _sum(buckets: list[list[int]], oldest: float, column: int = 1) -> int:
    total = 0
    for bucket in reversed(buckets):  # newest last: walk back to the window's start
        if bucket[0] < oldest:
            break
        total += bucket[column]
    return total


class AnvilTable:
    """The counts themselves, answered at once.

    Times come from `clock` and go into one-second buckets: an event counts in a
    window of W seconds while its second is no older than W, so it may be
    forgotten up to a second early, never kept late. Events are kept as long as
    the longest window asked for (at most `HORIZON`); clients nothing is
    remembered about are dropped once a minute; at most `max_clients` are kept
    (when full, the least recently seen one without open sessions goes).
    """

    def __init__(self, clock: IReactorTime, *, max_clients: int = MAX_CLIENTS) -> None:
        self.clock = clock
        self.max_clients = max_clients
        self.clients: OrderedDict[str, _Client] = OrderedDict()  # least recently seen first
        self.sessions = 0
        # how long each kind of event must be kept: the longest window asked for
        self._keep = {"connects": 0.0, "sessions": 0.0, "auth_failures": 0.0}
        self._last_sweep = clock.seconds()

    # --- the questions -------------------------------------------------------------

    def connect(self, client: str, rate_window: float, error_window: float) -> ClientCounts:
        """Count a new session of `client`; its counts, this session included.

        This runs for every new connection of every SMTP worker (the limits filter):
        a new client's counts are read without walking its (empty) buckets.
        """
        now = self._now()
        rate_window = self._window("connects", rate_window)
        error_window = self._window("sessions", error_window)
        entry = self._entry(client)
        entry.concurrent += 1
        self.sessions += 1
        second = int(now)
        connects = entry.connects
        _add(connects, second, 1)
        errors = commands = 0
        if entry.sessions:  # a client seen before: its sessions that ended in the window
            errors = _sum(entry.sessions, now - error_window, 1)
            commands = _sum(entry.sessions, now - error_window, 2)
        return ClientCounts(
            entry.concurrent,
            self.sessions,
            connects[0][1]  # a new client: its one bucket, this second's, is in the window
            if len(connects) == 1 and second >= now - rate_window
            else _sum(connects, now - rate_window),
            errors,
            commands,
        )

    def disconnect(self, client: str, errors: int, commands: int, *, release: bool = True) -> None:
        """A session ended; `release` False records its numbers without counting it down."""
        now = self._now()
        entry = self.clients.get(client)
        if release and entry is not None:
            self._release(entry, 1)
        if errors > 0 or commands > 0:
            _add(self._entry(client).sessions, int(now), max(errors, 0), max(commands, 0))

    def release(self, client: str, count: int) -> None:
        """Count down `count` open sessions of `client` (never below zero)."""
        entry = self.clients.get(client)
        if entry is not None:
            self._release(entry, count)

    def _release(self, entry: _Client, count: int) -> None:
        released = min(count, entry.concurrent)
        entry.concurrent -= released
        self.sessions -= released

    def auth_status(self, client: str, window: float) -> AuthState:
        now = self._now()
        window = self._window("auth_failures", window)
        entry = self.clients.get(client)
        if entry is None:
            return AuthState(0)
        return AuthState(_sum(entry.auth_failures, now - window), max(entry.locked_until - now, 0.0))

    def auth_failed(self, client: str, window: float, limit: int, lockout: float) -> AuthState:
        """Count an AUTH failure; the `limit`-th in `window` locks the client out for `lockout`."""
        now = self._now()
        window = self._window("auth_failures", window)
        entry = self._entry(client)
        _add(entry.auth_failures, int(now), 1)
        failures = _sum(entry.auth_failures, now - window)
        if limit > 0 and failures >= limit:
            entry.locked_until = max(entry.locked_until, now + lockout)
        return AuthState(failures, max(entry.locked_until - now, 0.0))

    # --- bookkeeping ---------------------------------------------------------------

    def _now(self) -> float:
        now = self.clock.seconds()
        if now - self._last_sweep >= SWEEP_INTERVAL:
            self._last_sweep = now
            self.sweep(now)
        return now

    def _window(self, kind: str, window: float) -> float:
        window = min(max(window, 0.0), HORIZON)
        if window > self._keep[kind]:
            self._keep[kind] = window
        return window

    def _entry(self, client: str) -> _Client:
        entry = self.clients.get(client)
        if entry is None:
            if len(self.clients) >= self.max_clients:
                self._evict()
            entry = self.clients[client] = _Client()
        else:
            self.clients.move_to_end(client)
        return entry

    def _idle(self, entry: _Client, now: float) -> bool:
        _trim(entry.connects, math.floor(now - self._keep["connects"]))
        _trim(entry.sessions, math.floor(now - self._keep["sessions"]))
        _trim(entry.auth_failures, math.floor(now - self._keep["auth_failures"]))
        return (
            entry.concurrent == 0
            and entry.locked_until <= now
            and not (entry.connects or entry.sessions or entry.auth_failures)
        )

    def sweep(self, now: float | None = None) -> None:
        """Drop the clients nothing is remembered about any more."""
        now = self.clock.seconds() if now is None else now
        for client in [c for c, entry in self.clients.items() if self._idle(entry, now)]:
            del self.clients[client]

    def _evict(self) -> None:
        """Make room for one client in a full table, in constant time.

        No sweep here: a table full of clients seen inside the window would be
        walked whole for every new client (132 ms each at 100,000 clients, so a
        worker under a spam run from many addresses would serve a few sessions a
        second). The once-a-minute sweep in `_now` drops the forgotten ones; the
        least recently seen client is the oldest anyway.
        """
        clients = self.clients
        # the least recently seen one with no session open; those with sessions open
        # that are passed on the way go to the back (they are in use), so the next
        # eviction does not walk past them again
        for _ in range(len(clients)):
            client, entry = next(iter(clients.items()))
            if entry.concurrent == 0:
                del clients[client]
                return
            clients.move_to_end(client)
        # every one has a session open: forget the oldest, and its count with it
        _, entry = clients.popitem(last=False)
        self.sessions -= entry.concurrent
