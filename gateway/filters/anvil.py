"""The anvil: connection and event counts per client, shared by all SMTP processes.

Named after Postfix's anvil(8), which does the same for its smtpd processes. The
"limits" filter asks it at each connection how many sessions the client has open
now, how many it opened in the last minute and how its recent sessions went
(errors against commands), and tells it about AUTH failures.

With the listeners in the main process (``smtp.workers = 0``) the filter talks
to `Anvil`, an in-memory table (`gateway.filters._anvil_table`) in that process.
With worker processes the table lives in the main process only: `AnvilServer`
serves it on a UNIX socket (``<state_dir>/anvil.sock``, mode 0600) and each
worker uses an `AnvilClient`, which has the same Deferred-returning API.
`connect_anvil` picks one of the two.

The socket speaks one ASCII line per request and one per answer, in order::

    CONNECT <client> <rate_window> <error_window>  ->  OK <concurrent> <sessions> <rate> <errors> <commands>
    DISCONNECT <client> <errors> <commands>        ->  OK
    AUTH-STATUS <client> <window>                  ->  OK <failures> <locked_for>
    AUTH-FAIL <client> <window> <limit> <lockout>  ->  OK <failures> <locked_for>
    (anything else)                                ->  ERR <why>

The client reconnects by itself (the main process restarted its socket, say); a
request the anvil cannot answer fails with `AnvilUnavailable` (`AnvilNotAsked`
when it never left the worker), which the chain
runner turns into the filter's failure verdict (DEFER unless configured
otherwise): the limits are never silently skipped. The server counts down the
sessions a client connection counted up when that connection ends (a worker
that died), so a crash never leaves a client's count stuck high.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from gateway.filters._anvil_table import HORIZON, MAX_CLIENTS, AnvilTable, AuthState, ClientCounts

__all__ = [
    "HORIZON",
    "Anvil",
    "AnvilClient",
    "AnvilError",
    "AnvilNotAsked",
    "AnvilServer",
    "AnvilTable",
    "AnvilUnavailable",
    "AuthState",
    "ClientCounts",
    "IAnvil",
    "anvil_socket_path",
    "connect_anvil",
    "process_anvil",
]

log = Logger(namespace="mailgate.anvil")

T = TypeVar("T")

REQUEST_TIMEOUT = 5.0  # seconds a worker waits for the main process's answer
MAX_LINE = 512


class AnvilError(Exception):
    """The anvil refused a request (a bug: the two ends disagree)."""


class AnvilUnavailable(AnvilError):
    """The anvil could not be asked: its socket is gone, or it did not answer in time."""


class AnvilNotAsked(AnvilUnavailable):
    """The request never left this process, so the anvil counted nothing for it."""


class IAnvil(Interface):
    """Connection and event counts per client; every answer is a Deferred."""

    def connect(client: str, rate_window: float, error_window: float) -> Deferred[ClientCounts]:
        """Count a new session of `client` (an IP address as text); its counts now."""

    def disconnect(client: str, errors: int, commands: int) -> Deferred[None]:
        """A session `connect` counted has ended with these totals."""

    def auth_status(client: str, window: float) -> Deferred[AuthState]:
        """The client's AUTH failures in the last `window` seconds, and any lockout."""

    def auth_failed(client: str, window: float, limit: int, lockout: float) -> Deferred[AuthState]:
        """Count an AUTH failure; with `limit` failures in `window`, lock out for `lockout` s."""


@implementer(IAnvil)
class Anvil:
    """The anvil in this process: an `AnvilTable` behind the Deferred API."""

    def __init__(self, clock: IReactorTime, *, max_clients: int = MAX_CLIENTS) -> None:
        self.table = AnvilTable(clock, max_clients=max_clients)

    def connect(self, client: str, rate_window: float, error_window: float) -> Deferred[ClientCounts]:
        return succeed(self.table.connect(client, rate_window, error_window))

    def disconnect(self, client: str, errors: int, commands: int) -> Deferred[None]:
        self.table.disconnect(client, errors, commands)
        return succeed(None)

    def auth_status(self, client: str, window: float) -> Deferred[AuthState]:
        return succeed(self.table.auth_status(client, window))

    def auth_failed(self, client: str, window: float, limit: int, lockout: float) -> Deferred[AuthState]:
        return succeed(self.table.auth_failed(client, window, limit, lockout))


# --- the server (main process) --------------------------------------------------------


def _client_word(text: str) -> str:
    if not text or len(text) > 64:
        raise ValueError("bad client")
    return text


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad duration {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"bad count {text!r}")
    return value


class _ServerProtocol(LineOnlyReceiver):
    """One worker's connection to the anvil: requests in, answers out, in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, table: AnvilTable) -> None:
        self.table = table
        self.held: dict[str, int] = {}  # sessions this connection counted up and not yet down
        self.lost: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        try:
            answer = self._answer(line.decode("ascii").split())
        except (ValueError, UnicodeDecodeError) as error:
            answer = f"ERR {error}".replace("\n", " ")
        self.sendLine(answer.encode("ascii", "replace"))  # type: ignore[no-untyped-call]

    def _answer(self, words: list[str]) -> str:
        verb, arguments = (words[0], words[1:]) if words else ("", [])
        if verb == "CONNECT" and len(arguments) == 3:
            client = _client_word(arguments[0])
            counts = self.table.connect(client, _seconds(arguments[1]), _seconds(arguments[2]))
            self.held[client] = self.held.get(client, 0) + 1
            return f"OK {counts.concurrent} {counts.sessions} {counts.rate} {counts.errors} {counts.commands}"
        if verb == "DISCONNECT" and len(arguments) == 3:
            client = _client_word(arguments[0])
            errors, commands = _count(arguments[1]), _count(arguments[2])
            held = self.held.get(client, 0)
            # a session counted up on an earlier connection was counted down when it ended
            if held > 1:
                self.held[client] = held - 1
            else:
                self.held.pop(client, None)
            self.table.disconnect(client, errors, commands, release=held > 0)
            return "OK"
        if verb == "AUTH-STATUS" and len(arguments) == 2:
            state = self.table.auth_status(_client_word(arguments[0]), _seconds(arguments[1]))
            return f"OK {state.failures} {state.locked_for:.3f}"
        if verb == "AUTH-FAIL" and len(arguments) == 4:
            client = _client_word(arguments[0])
            window, limit, lockout = _seconds(arguments[1]), _count(arguments[2]), _seconds(arguments[3])
            state = self.table.auth_failed(client, window, limit, lockout)
            return f"OK {state.failures} {state.locked_for:.3f}"
        raise ValueError(f"unknown request {' '.join(words)[:40]!r}")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        held, self.held = self.held, {}
        for client, count in held.items():
            self.table.release(client, count)
        self.lost.callback(None)


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, table: AnvilTable) -> None:
        self.table = table
        self.connections: set[_ServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> _ServerProtocol:
        protocol = _ServerProtocol(self.table)
        self.connections.add(protocol)
        protocol.lost.addCallback(lambda _: self.connections.discard(protocol))
        return protocol


class AnvilServer(Service):
    """Serves this process's anvil to the SMTP workers on a UNIX socket (mode 0600).

    It binds in `privilegedStartService`, so it must come before the workers in
    the service tree; `owner` (uid, gid), when set before the start, is given
    the socket, for workers that run as the gateway's user.
    """

    def __init__(self, path: str, anvil: Anvil, reactor: Any) -> None:
        self.path = path
        self.anvil = anvil
        self.reactor = reactor
        self.owner: tuple[int, int] | None = None
        self.port: IListeningPort | None = None
        self.factory = _ServerFactory(anvil.table)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listen()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._listen()  # runners without a privileged start

    def _listen(self) -> None:
        if self.port is not None:
            return
        # wantPID: a lock file beside the socket; a stale socket of a dead process is removed
        self.port = self.reactor.listenUNIX(self.path, self.factory, mode=0o600, wantPID=True)
        if self.owner is not None:
            for name in (self.path, self.path + ".lock"):
                if os.path.lexists(name):
                    os.lchown(name, *self.owner)
        log.info("anvil listening on {path}", path=self.path)

    def stopService(self) -> Deferred[None]:
        """Stop listening and close the workers' connections (they reconnect to the next one)."""
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        waits: list[Deferred[Any]] = []
        stopped = port.stopListening() if port is not None else None
        if stopped is not None:
            waits.append(stopped)
        for protocol in list(self.factory.connections):
            waits.append(protocol.lost)
            protocol.transport.loseConnection()  # type: ignore[union-attr]
        return gatherResults(waits).addCallback(lambda _: None)


# --- the client (workers) -------------------------------------------------------------


@attrs.define(eq=False)
class _Pending:
    """A request on its way: the line, what to make of the answer, and its timer."""

    line: bytes
    parse: Callable[[list[str]], Any]
    deferred: Deferred[Any]
    timer: IDelayedCall | None = None
    sent: bool = False


class _ClientProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, owner: AnvilClient) -> None:
        self.owner = owner
        self.pending: deque[_Pending] = deque()
        self.lost: Deferred[None] = Deferred()

    def send(self, pending: _Pending) -> None:
        pending.sent = True
        self.pending.append(pending)
        self.sendLine(pending.line)  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        if not self.pending:
            self.transport.loseConnection()  # type: ignore[union-attr]  # an answer to nothing
            return
        pending = self.pending.popleft()
        words = line.decode("ascii", "replace").split()
        try:
            if not words or words[0] != "OK":
                raise AnvilError(f"the anvil refused {pending.line.decode()!r}: {' '.join(words[1:])}")
            result = pending.parse(words[1:])
        except (AnvilError, ValueError, IndexError) as error:
            self.owner._fail(pending, error if isinstance(error, AnvilError) else AnvilError(error))
        else:
            self.owner._settle(pending, result)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pending, self.pending = self.pending, deque()
        self.owner._lost(self, reason)
        for request in pending:
            self.owner._fail(request, AnvilUnavailable("the connection to the anvil was lost"))
        self.lost.callback(None)


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, owner: AnvilClient) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self.owner)


def _client_counts(words: list[str]) -> ClientCounts:
    return ClientCounts(*(int(word) for word in words[:5]))


def _auth_state(words: list[str]) -> AuthState:
    return AuthState(int(words[0]), float(words[1]))


@implementer(IAnvil)
class AnvilClient:
    """A worker's anvil: the main process's, asked over its UNIX socket.

    It connects on the first request and again after the connection is lost;
    requests made meanwhile wait for the connection. A request that cannot be
    sent, or gets no answer in `timeout` seconds, fails with `AnvilUnavailable`.
    """

    def __init__(self, path: str, reactor: Any, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = path
        self.reactor = reactor
        self.timeout = timeout
        self.protocol: _ClientProtocol | None = None
        self._connecting = False
        self._queued: list[_Pending] = []
        self._outage = False  # logged once per outage

    # --- IAnvil ------------------------------------------------------------------------

    def connect(self, client: str, rate_window: float, error_window: float) -> Deferred[ClientCounts]:
        return self._call("CONNECT", client, f"{rate_window:g} {error_window:g}", _client_counts)

    def disconnect(self, client: str, errors: int, commands: int) -> Deferred[None]:
        return self._call("DISCONNECT", client, f"{errors:d} {commands:d}", lambda words: None)

    def auth_status(self, client: str, window: float) -> Deferred[AuthState]:
        return self._call("AUTH-STATUS", client, f"{window:g}", _auth_state)

    def auth_failed(self, client: str, window: float, limit: int, lockout: float) -> Deferred[AuthState]:
        return self._call("AUTH-FAIL", client, f"{window:g} {limit:d} {lockout:g}", _auth_state)

    # --- the connection ----------------------------------------------------------------

    def _call(self, verb: str, client: str, rest: str, parse: Callable[[list[str]], T]) -> Deferred[T]:
        if not client.isascii() or not client.isprintable() or " " in client or not 0 < len(client) <= 64:
            return fail(AnvilNotAsked(f"cannot ask the anvil about client {client[:64]!r}"))
        line = f"{verb} {client} {rest}".encode("ascii")
        pending = _Pending(line, parse, Deferred())
        pending.timer = self.reactor.callLater(self.timeout, self._timed_out, pending)
        if self.protocol is not None:
            self.protocol.send(pending)
        else:
            self._queued.append(pending)
            self._connect()
        result: Deferred[T] = pending.deferred
        return result

    def _connect(self) -> None:
        if self._connecting:
            return
        self._connecting = True
        endpoint = UNIXClientEndpoint(self.reactor, self.path, timeout=self.timeout)  # type: ignore[no-untyped-call]
        endpoint.connect(_ClientFactory(self)).addCallbacks(  # type: ignore[no-untyped-call]
            self._connected, self._not_connected
        )

    def _connected(self, protocol: _ClientProtocol) -> None:
        self._connecting = False
        self.protocol = protocol
        if self._outage:
            self._outage = False
            log.info("anvil at {path} reachable again", path=self.path)
        queued, self._queued = self._queued, []
        for pending in queued:
            if not pending.deferred.called:
                protocol.send(pending)

    def _not_connected(self, reason: Failure) -> None:
        self._connecting = False
        if not self._outage:
            self._outage = True
            log.warn(
                "cannot reach the anvil at {path}: {error}; connection limits answer with their "
                "failure verdict until it is back",
                path=self.path,
                error=reason.getErrorMessage(),
            )
        queued, self._queued = self._queued, []
        for pending in queued:
            self._fail(pending, AnvilNotAsked(f"cannot reach the anvil at {self.path}"))

    def _lost(self, protocol: _ClientProtocol, reason: Failure) -> None:
        if self.protocol is protocol:
            self.protocol = None
            if self._queued:
                self._connect()

    def _timed_out(self, pending: _Pending) -> None:
        pending.timer = None
        problem = f"no answer from the anvil in {self.timeout:g} s"
        if not pending.sent:
            if pending in self._queued:
                self._queued.remove(pending)
            self._fail(pending, AnvilNotAsked(problem))
            return
        self._fail(pending, AnvilUnavailable(problem))
        if self.protocol is not None:
            # answers come in order: with one missing, the rest would be misread
            self.protocol.transport.abortConnection()  # type: ignore[union-attr]

    def _settle(self, pending: _Pending, result: Any) -> None:
        if self._stop_timer(pending):
            pending.deferred.callback(result)

    def _fail(self, pending: _Pending, error: Exception) -> None:
        if self._stop_timer(pending):
            pending.deferred.errback(error)

    def _stop_timer(self, pending: _Pending) -> bool:
        """False when the request is settled already (it timed out)."""
        if pending.deferred.called:
            return False
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        return True

    def close(self) -> Deferred[None]:
        """Drop the connection; fires once it is gone (a worker's ends with the process)."""
        protocol = self.protocol
        if protocol is None:
            return succeed(None)
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        return protocol.lost


# --- which anvil ----------------------------------------------------------------------


def anvil_socket_path(config: Any) -> str:
    """Where the main process serves its anvil to the workers: <state_dir>/anvil.sock."""
    return os.path.join(config.gateway.state_dir, "anvil.sock")


_process_anvil: Anvil | None = None


def process_anvil(reactor: Any) -> Anvil:
    """This process's one in-memory anvil (the one `AnvilServer` serves)."""
    global _process_anvil
    if _process_anvil is None or _process_anvil.table.clock is not reactor:
        _process_anvil = Anvil(reactor)
    return _process_anvil


def connect_anvil(config: Any, reactor: Any) -> Anvil | AnvilClient:
    """The anvil for this process's filters: in one of several workers (``MAILGATE_WORKER``
    set) a client of the main process's, otherwise this process's own. A single worker
    serves every session itself: its own table counts them all, with no round trip to
    the main process per connection (the counts restart with the worker, as Postfix's
    anvil's do with anvil)."""
    if os.environ.get("MAILGATE_WORKER") and config.smtp.workers > 1:
        return AnvilClient(anvil_socket_path(config), reactor)
    return process_anvil(reactor)
