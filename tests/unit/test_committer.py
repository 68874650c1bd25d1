"""The group-commit writer's threads: one takes what piles up; more start only when much waits."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from twisted.internet.defer import Deferred, gatherResults

from gateway.queue._committer import SPREAD, Disk, GroupCommitter
from gateway.queue.testing import PumpedReactor


class Step:
    """An operation that records the thread running it, and can be held in prepare()."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold = hold
        self.started = threading.Event()
        self.thread = ""

    def prepare(self, disk: Disk) -> Iterable[str]:
        self.thread = threading.current_thread().name
        self.started.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        return ()

    def publish(self, disk: Disk) -> Iterable[str]:
        return ()

    def finish(self, disk: Disk) -> str:
        return self.thread

    def undo(self, disk: Disk) -> None:
        return None


def test_operations_wait_behind_a_busy_thread_in_one_batch_until_many_wait() -> None:
    reactor = PumpedReactor()
    committer = GroupCommitter(reactor, Disk(fsync=False), threads=4)
    release = threading.Event()
    first = Step(release)
    done: list[Deferred[str]] = [committer.submit(first)]
    assert first.started.wait(10)
    few = [Step() for _ in range(SPREAD - 2)]  # one short of SPREAD waiting
    done += [committer.submit(step) for step in few]
    assert len(committer._threads) == 1  # a few waiting: no second thread for them
    release.set()
    names = reactor.wait(gatherResults(done))
    assert set(names) == {names[0]}  # all in the one thread
    assert committer.batches == 2  # the held one, then everything that piled up behind it

    release.clear()
    held = Step(release)
    done = [committer.submit(held)]
    assert held.started.wait(10)
    many = [Step() for _ in range(SPREAD)]
    done += [committer.submit(step) for step in many]
    assert many[0].started.wait(10)  # enough waiting: another thread took them meanwhile
    assert many[0].thread != held.thread
    release.set()
    reactor.wait(gatherResults(done))
    reactor.wait(committer.stop())
