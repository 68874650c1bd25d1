"""What the POP2 and POP3 wires share: the answer timer, the TLS handshake wait, close and abort."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from gateway.fetch import FetchError


class WireBase:
    """Mixin for a line protocol client waiting for its server's answers.

    The class sets `clock`, `timeout`, `peer`, `tls` (a `TlsStage`), `closed`,
    `error`, ``_timer = None`` and ``_handshake_waiters = []``, and says what it
    is waiting for in `_waiting_for()`. The timer restarts whenever bytes arrive
    (`_start_timer` while armed), so a long message may take longer in all; only
    silence is punished.
    """

    clock: IReactorTime
    timeout: float
    peer: str
    tls: Any
    closed: bool
    error: BaseException | None
    transport: Any
    _timer: IDelayedCall | None
    _handshake_waiters: list[Deferred[None]]

    def handshake(self) -> Deferred[None]:
        """Fires once the TLS handshake is done (at once if it is)."""
        waiter: Deferred[None] = Deferred()
        if self.tls.done:
            waiter.callback(None)
        elif self.closed:
            waiter.errback(self.error or FetchError(f"connection with {self.peer} is closed"))
        else:
            self._handshake_waiters.append(waiter)
        return waiter

    def close(self) -> None:
        """Close once what was written has gone out."""
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def abort(self, error: BaseException | None = None) -> None:
        """Drop the connection at once; waiting requests fail now with `error` (or "aborted")."""
        if self.error is None:
            self.error = error or FetchError(f"session with {self.peer} aborted")
        if not self.closed:
            if self.transport is not None:
                self.transport.abortConnection()
            # Not waiting for the transport to report it (a real one does so a turn later).
            self.connectionLost(Failure(self.error))  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        raise NotImplementedError

    def _start_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        else:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.abort(FetchError(f"{self.peer} sent nothing for {self.timeout:g} s while {self._waiting_for()}"))

    def _waiting_for(self) -> str:
        raise NotImplementedError
