"""train-spam / train-ham: Bayes must learn; spamd's TELL is best effort."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from gateway.quarantine.training import QuarantineTrainer, spamd_learner
from tests.unit.reception_driver import fired


class Told:
    def __init__(self, failure: Exception | None = None) -> None:
        self.told: list[tuple[bytes, str]] = []
        self.failure = failure

    def tell(self, message: bytes, kind: str) -> Deferred[Any]:
        self.told.append((message, kind))
        return fail(self.failure) if self.failure else succeed(None)


def test_both_learn_and_a_spamd_refusing_tell_does_not_stop_the_training() -> None:
    learned: list[tuple[bytes, bool]] = []
    spamd = Told(ConnectionRefusedError("spamd without --allow-tell"))
    trainer = QuarantineTrainer(
        [lambda message, spam: succeed(learned.append((message, spam)))], [("spamd", spamd_learner(spamd))]
    )
    assert fired(trainer(b"Subject: x\r\n\r\n", True)) is None
    assert learned == [(b"Subject: x\r\n\r\n", True)]
    assert spamd.told == [(b"Subject: x\r\n\r\n", "spam")]


def test_a_bayes_failure_fails_the_training() -> None:
    trainer = QuarantineTrainer([lambda message, spam: fail(OSError("disk full"))], [])
    with pytest.raises(OSError, match="disk full"):
        fired(trainer(b"x", False))
