"""Fakes for tests of the filter chain: a filter that answers as told and records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from gateway.filters import Request
from gateway.interfaces import IFilter, IOutbox
from gateway.model import CONTINUE, Stage, Verdict


@implementer(IFilter)
class StaticFilter:
    """Answers each stage with a fixed verdict (or a Deferred, or by raising) and records requests.

    `answers` maps a Stage to a Verdict, to a callable (request -> Verdict |
    Deferred | raises), or to "wait" (an unfired Deferred kept in `waiting`).
    """

    def __init__(
        self,
        name: str,
        answers: dict[Stage, Any] | None = None,
        stages: frozenset[Stage] | None = None,
    ) -> None:
        self.name = name
        self.answers = answers or {}
        self.stages = stages if stages is not None else frozenset(self.answers) or frozenset(Stage)
        self.requests: list[Request] = []
        self.waiting: list[Deferred[Verdict]] = []

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        self.requests.append(request)
        answer = self.answers.get(request.stage, CONTINUE)
        if answer == "wait":
            deferred: Deferred[Verdict] = Deferred()
            self.waiting.append(deferred)
            return deferred
        if callable(answer):
            result: Verdict | Deferred[Verdict] = answer(request)
            return result
        assert isinstance(answer, Verdict)
        return answer

    @classmethod
    def from_config(cls, options: Any, services: Any) -> StaticFilter:
        """As a registered filter (tests of the registry): answers CONTINUE everywhere."""
        action = options.take("stages", list, ["connect"])
        return cls("static", stages=frozenset(Stage(s) for s in action))


def raising(error: Exception) -> Callable[[Request], Verdict]:
    def answer(request: Request) -> Verdict:
        raise error

    return answer


@implementer(IOutbox)
class RecordingOutbox:
    """An IOutbox that keeps what it is asked to send, in `sent` (mail_from, rcpt_to, message)."""

    def __init__(self, postmaster: str = "postmaster@example.com") -> None:
        self.postmaster = postmaster
        self.sent: list[tuple[str, tuple[str, ...], bytes]] = []
        self.failure: Exception | None = None  # set to make send() fail

    def send(self, mail_from: str, rcpt_to: tuple[str, ...], message: bytes) -> Deferred[str]:
        from twisted.internet.defer import fail, succeed

        if self.failure is not None:
            return fail(self.failure)
        self.sent.append((mail_from, tuple(rcpt_to), message))
        return succeed(f"OUTBOX{len(self.sent):04d}")
