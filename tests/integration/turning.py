"""Turning the real reactor by hand, for integration tests written as plain pytest functions."""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.fetch import FetchError


def wait(deferred: Deferred[Any], timeout: float = 30.0) -> Any:
    """Run the reactor until `deferred` fires; its result, or its failure raised."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    deadline = time.monotonic() + timeout
    while not results and time.monotonic() < deadline:
        reactor.runUntilCurrent()  # type: ignore[attr-defined]
        reactor.doIteration(0.01)  # type: ignore[attr-defined]
    assert results, f"no answer within {timeout:g} s"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure(deferred: Deferred[Any], timeout: float = 30.0) -> FetchError:
    """The FetchError `deferred` fails with (the test fails if it does not)."""
    with pytest.raises(FetchError) as caught:
        wait(deferred, timeout)
    return caught.value
