"""Test support for code that runs a DirectorySpool without a running reactor."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class PumpedReactor:
    """An IReactorFromThreads whose calls from threads run when the test pumps them."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
        self._calls = queue.SimpleQueue()

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._calls.put((callable, args, kwargs))

    def pump(self, timeout: float = 0.0) -> int:
        """Run the calls waiting (waiting up to `timeout` for the first); returns how many."""
        count = 0
        try:
            call = self._calls.get(timeout=timeout) if timeout > 0 else self._calls.get_nowait()
            while True:
                function, args, kwargs = call
                function(*args, **kwargs)
                count += 1
                call = self._calls.get_nowait()
        except queue.Empty:
            return count

    def wait(self, deferred: Deferred[T], timeout: float = 10.0) -> T:
        """Pump until `deferred` fires; its result, or its failure raised."""
        outcome: list[Any] = []
        deferred.addBoth(outcome.append)
        deadline = time.monotonic() + timeout
        while not outcome:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{deferred!r} did not fire within {timeout} s")
            self.pump(min(left, 0.1))
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        result: T = outcome[0]
        return result
