"""One question to a scanner daemon per connection, with a limit on connections and on time.

`ScannerConnections` is shared by every check of one filter: at most
`max_connections` are open at once (the others wait their turn, as spamc and
amavis queue on spamd's --max-children), each connect must succeed within
`connect_timeout`, and the whole exchange, the wait for a turn included, must end
within `timeout`. `ExchangeProtocol` is the part each daemon's client fills in:
what to send once connected, and how to read the answer, into a bounded buffer.

The Deferred of an exchange can be cancelled (the chain runner does so when the
filter's own timeout passes): the connection is dropped and its turn given back.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from gateway.scanners import ScannerError, ScannerProtocolError, ScannerTimeout, ScannerUnavailable

T = TypeVar("T")


class ExchangeProtocol(Protocol, Generic[T]):
    """One request and its answer; `finished` fires with the parsed answer or a ScannerError.

    Subclasses write their request in `send()` and read the answer in `parse()`,
    which returns None while the answer is incomplete. The answer is kept in
    memory up to `max_reply` bytes: a daemon that talks on beyond it is cut off.
    """

    scanner = "scanner"  # the daemon's name, for messages

    def __init__(self, max_reply: int) -> None:
        self.max_reply = max_reply
        self.finished: Deferred[T] = Deferred()
        self.buffer = bytearray()

    def send(self) -> None:
        raise NotImplementedError

    def parse(self, reply: bytes, complete: bool) -> T | None:
        """The answer from what has arrived; `complete` is True once the daemon has closed.

        Raise ScannerProtocolError for an error or a malformed answer; return None
        while more is to come (when `complete`, None means the answer was cut short).
        """
        raise NotImplementedError

    def connectionMade(self) -> None:
        self.send()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.buffer += data
        if len(self.buffer) > self.max_reply:
            self._fail(ScannerProtocolError(f"{self.scanner} answered more than {self.max_reply} bytes"))
            return
        self._try(complete=False)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.finished.called:
            self._try(complete=True)

    def _try(self, complete: bool) -> None:
        try:
            answer = self.parse(bytes(self.buffer), complete)
        except ScannerError as error:
            self._fail(error)
            return
        if answer is not None:
            self._close()  # first: whoever waits for the answer may drop the connection at once
            self.finished.callback(answer)
        elif complete:
            self._fail(
                ScannerUnavailable(
                    f"{self.scanner} closed the connection before its answer was complete"
                    f" ({len(self.buffer)} bytes received)"
                )
            )

    def _fail(self, error: ScannerError) -> None:
        if not self.finished.called:
            self.finished.errback(error)
        self._close()

    def _close(self) -> None:
        """Close after an answer or an error: anything still being sent is dropped."""
        transport = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return
        if getattr(transport, "producer", None) is not None:
            # loseConnection would wait for the producer to finish
            transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()


class _Once(Factory):
    """A factory for one given protocol instance."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        self.protocol_instance.factory = self
        return self.protocol_instance


def client_endpoint(reactor: Any, spec: str) -> IStreamClientEndpoint:
    """The endpoint for a scanner's address, a Twisted client string: "tcp:127.0.0.1:783",
    "unix:/var/run/clamav/clamd.ctl". ValueError names what is wrong; nothing connects yet."""
    from twisted.internet.endpoints import clientFromString

    try:
        endpoint: IStreamClientEndpoint = clientFromString(reactor, spec)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ValueError(
            f'{spec!r} is not a client endpoint like "tcp:127.0.0.1:783" or "unix:/path" ({error})'
        ) from None
    return endpoint


class ScannerConnections:
    """Exchanges with one daemon at `endpoint`: limited in number and in time (module docstring)."""

    def __init__(
        self,
        scanner: str,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        address: str = "",
        max_connections: int = 5,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.scanner = scanner
        self.endpoint = endpoint
        self.clock = clock
        self.address = address or scanner
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.slots = DeferredSemaphore(max_connections)

    @property
    def busy(self) -> int:
        """Connections open (or being opened) right now."""
        return self.max_connections - self.slots.tokens

    @property
    def waiting(self) -> int:
        """Exchanges waiting for a free connection."""
        return len(self.slots.waiting)

    def exchange(self, protocol: ExchangeProtocol[T]) -> Deferred[T]:
        """Connect, let `protocol` ask its question, and fire with its answer (cancellable)."""
        return _Exchange(self, protocol).result


class _Exchange(Generic[T]):
    """The life of one exchange: wait for a turn, connect, ask, answer; every exit cleans up once."""

    def __init__(self, pool: ScannerConnections, protocol: ExchangeProtocol[T]) -> None:
        self.pool = pool
        self.protocol = protocol
        self.done = False
        self.holding = False
        self.connecting: Deferred[Any] | None = None
        self.connect_timer: IDelayedCall | None = None
        self.result: Deferred[T] = Deferred(self._cancelled)
        self.timer: IDelayedCall | None = pool.clock.callLater(pool.timeout, self._timed_out)
        self.turn: Deferred[Any] | None = pool.slots.acquire()
        self.turn.addCallbacks(self._got_turn, lambda _: None)

    def _got_turn(self, _: object) -> None:
        self.turn = None
        self.holding = True
        if self.done:  # the exchange ended while the turn was being handed over
            self._release()
            return
        connecting: Deferred[Any] = self.pool.endpoint.connect(_Once(self.protocol))
        self.connecting = connecting
        self.connect_timer = self.pool.clock.callLater(self.pool.connect_timeout, self._connect_timed_out)
        connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, _: object) -> None:
        self.connecting = None
        self._stop(self.connect_timer)
        self.connect_timer = None
        if self.done:  # connected just as it was given up
            self._abort()
            return
        self.protocol.finished.addCallbacks(self._answered, self._failed)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if isinstance(failure.value, CancelledError):
            return  # we gave up on it ourselves: the reason is already given
        self._end(
            ScannerUnavailable(
                f"cannot connect to {self.pool.scanner} at {self.pool.address}: {failure.getErrorMessage()}"
            )
        )

    def _connect_timed_out(self) -> None:
        self.connect_timer = None
        self._end(
            ScannerTimeout(
                f"cannot connect to {self.pool.scanner} at {self.pool.address}: "
                f"no connection within {self.pool.connect_timeout:g} s"
            )
        )

    def _timed_out(self) -> None:
        self.timer = None
        if self.holding:
            problem = f"no answer within {self.pool.timeout:g} s"
        else:
            problem = (
                f"no free connection within {self.pool.timeout:g} s (all {self.pool.max_connections} in use)"
            )
        self._end(ScannerTimeout(f"{self.pool.scanner} at {self.pool.address}: {problem}"))

    def _answered(self, answer: T) -> None:
        self._end(answer)

    def _failed(self, failure: Failure) -> None:
        self._end(failure)

    def _cancelled(self, _: Deferred[T]) -> None:
        self._end(None)  # Deferred.cancel() then fails `result` with CancelledError

    def _end(self, outcome: T | Failure | ScannerError | None) -> None:
        """Stop the timers, drop the connection, give the turn back, then give the outcome."""
        if self.done:
            return
        self.done = True
        self._stop(self.timer)
        self._stop(self.connect_timer)
        self.timer = self.connect_timer = None
        if self.turn is not None:
            turn, self.turn = self.turn, None
            turn.cancel()  # leaves the queue of waiters
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        self._abort()
        self._release()
        if outcome is None or self.result.called:
            return
        if isinstance(outcome, (Failure, ScannerError)):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def _abort(self) -> None:
        transport = self.protocol.transport
        if transport is None:
            return
        if not self.protocol.finished.called:
            # the protocol's own Deferred must not be left failing with nobody listening
            self.protocol.finished.addErrback(lambda _: None)
        if getattr(transport, "disconnecting", False) or getattr(transport, "disconnected", False):
            return  # closing already (the protocol has its answer)
        transport.abortConnection()  # type: ignore[attr-defined]  # given up on: drop it now, whatever is still buffered

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.pool.slots.release()

    @staticmethod
    def _stop(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()
