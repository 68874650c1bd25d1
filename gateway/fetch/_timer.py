"""The answer timer the fetch protocols share: a server silent for `timeout` seconds is dropped."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from gateway.fetch import FetchError


class AnswerTimer:
    """Mixin for a client protocol waiting for its server's answers.

    The class sets `clock`, `timeout`, `peer` and ``_timer = None``, says what it
    is waiting for in `_waiting_for()`, and has `abort(error)`. The timer restarts
    whenever bytes arrive (`_start_timer` while armed), so a long message may
    take longer in all; only silence is punished.
    """

    clock: IReactorTime
    timeout: float
    peer: str
    _timer: IDelayedCall | None

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

    def abort(self, error: Any = None) -> None:
        raise NotImplementedError
