"""What "train-spam" and "train-ham" teach: the Bayes token store, and SpamAssassin's own Bayes.

The built-in classifier must learn (a failure fails the command, the message
stays in the quarantine); spamd's TELL is best effort (spamd may run without
``--allow-tell``): a failure there is logged and the command goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="mailgate.quarantine")

Learner = Callable[[bytes, bool], Deferred[Any]]


class QuarantineTrainer:
    """Teaches every classifier the gateway uses that a message is spam or ham."""

    def __init__(self, required: list[Learner], best_effort: list[tuple[str, Learner]]) -> None:
        self.required = required
        self.best_effort = best_effort

    def __call__(self, message: bytes, spam: bool) -> Deferred[None]:
        for name, learner in self.best_effort:
            try:
                told = learner(message, spam)
            except Exception:
                log.failure("quarantine: {name} could not learn the message", name=name)
                continue
            told.addErrback(self._failed, name)
        done: Deferred[Any] = succeed(None)
        for learner in self.required:
            done.addCallback(_then, learner, message, spam)
        return done.addCallback(lambda _: None)

    @staticmethod
    def _failed(failure: Failure, name: str) -> None:
        log.warn(
            "quarantine: {name} could not learn the message: {error}",
            name=name,
            error=failure.getErrorMessage(),
        )


def _then(_: object, learner: Learner, message: bytes, spam: bool) -> Deferred[Any]:
    return learner(message, spam)


def spamd_learner(client: Any) -> Learner:
    """spamd's TELL (`gateway.scanners.spamd.SpamdClient.tell`) as a learner."""
    return lambda message, spam: client.tell(message, "spam" if spam else "ham")
