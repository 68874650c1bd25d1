"""Fakes for tests of the filter chain: a filter that answers as told and records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from gateway.filters import Request
from gateway.interfaces import IFilter
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
