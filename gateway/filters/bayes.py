"""Bayes ("bayes"): the built-in statistical spam classifier, at the end of DATA.

The message's tokens (`gateway.bayes.tokenizer`) are looked up in the token
store (``<state_dir>/bayes.sqlite``) and combined by Robinson's and Fisher's
method (`gateway.bayes.classifier`) into a score from 0 (ham) to 10 (spam).
With the seed's thresholds (`gateway.bayes.policy`): above 5 the message is
tagged (``SPAM*** `` before its subject and an ``X-Mailgate-Bayes`` header with
the score), above 7 quarantined, above 9 deleted (DISCARD). Thresholds may be
set per recipient domain; with recipients in several domains the strictest
action wins, but deletion needs all of them (else quarantine).

Until `min_training` spams and as many hams are learned the classifier knows
too little: it gives no verdict (with `header_on_clean`, only the header).
Clean mail gets CONTINUE, or with `header_on_clean` a TAG carrying only the
header (the auto-whitelist counts any TAG as not clean, so that is off by
default).

Autolearning (off by default) learns only what the classifier is sure of:
a score below `autolearn_ham` as ham, above `autolearn_spam` as spam, once
trained past `min_training` — never its own uncertain calls in between. A ham
is learned only once the message is queued unheld and no other filter objected
to it (tagged, held, rejected it, gave it a score, or failed on it); a spam
once the gateway is done with it (queued, held or deleted).

A store that fails fails the check: the chain runner answers with the failure
verdict (a 4xx by default); mail is never passed as clean unchecked.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.bayes.classifier import Judgement, Robinson
from gateway.bayes.policy import Policy, Thresholds
from gateway.bayes.store import ITokenStore, TokenCounts, open_token_store
from gateway.bayes.tokenizer import DEFAULT_SUBJECT_PREFIX
from gateway.bayes.training import Sample, sample
from gateway.config import Section
from gateway.content import MessageContent, ParsedMessage
from gateway.filters import FilterServices, Request
from gateway.filters.auto_whitelist import judge
from gateway.filters.chain import Hit
from gateway.interfaces import IAcceptObserver, IFilter
from gateway.model import CONTINUE, Action, Stage, Verdict

log = Logger(namespace="mailgate.filter.bayes")

HEADER = "X-Mailgate-Bayes"


@attrs.frozen
class Autolearn:
    """When the filter learns from its own verdicts (module docstring); `enabled` False: never."""

    enabled: bool = False
    ham_below: float = 1.0
    spam_above: float = 9.5


DEFAULT_POLICY = Policy()
ROBINSON = Robinson()
NO_AUTOLEARN = Autolearn()


@implementer(IFilter, IAcceptObserver)
class Bayes:
    """Scores each message 0-10 by its tokens and tags, quarantines or deletes it (module docstring)."""

    name = "bayes"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        store: Callable[[], ITokenStore],
        *,
        policy: Policy = DEFAULT_POLICY,
        classifier: Robinson = ROBINSON,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        header: str = HEADER,
        header_on_clean: bool = False,
        min_training: int = 200,
        autolearn: Autolearn = NO_AUTOLEARN,
    ) -> None:
        self._store = store
        self.policy = policy
        self.classifier = classifier
        self.subject_prefix = subject_prefix
        self.header = header
        self.header_on_clean = header_on_clean
        self.min_training = min_training
        self.autolearn = autolearn
        self.untrained_logged = False
        # what autolearning waits to learn, until the gateway says what became of the message
        self._pending: weakref.WeakKeyDictionary[MessageContent, tuple[Sample, bool]]
        self._pending = weakref.WeakKeyDictionary()

    @property
    def store(self) -> ITokenStore:
        """The token store (`store` is called each time: it is opened once, at the first check)."""
        return self._store()

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Bayes:
        default = _thresholds(options, Thresholds())
        domains = options.sub("domains")
        overrides = {}
        for domain in list(domains.table):
            if not isinstance(domains.table[domain], dict):
                raise domains.error(domain, "must be a table of thresholds (tag, quarantine, delete)")
            section = domains.sub(domain)
            overrides[domain.lower().rstrip(".")] = _thresholds(section, default)
            section.done()
        subject_prefix = options.take("subject_prefix", str, DEFAULT_SUBJECT_PREFIX)
        header = options.take("header", str, HEADER)
        if header and (not header.isascii() or not header.replace("-", "").isalnum()):
            raise options.error(
                "header", f'must be a header field name like {HEADER!r} (or ""), not {header!r}'
            )
        header_on_clean = options.take("header_on_clean", bool, False)
        min_training = options.take("min_training", int, 200)
        if min_training < 1:
            raise options.error("min_training", "must be at least 1 (spams and hams each)")
        autolearn = Autolearn(
            options.take("autolearn", bool, False),
            options.take("autolearn_ham", float, 1.0),
            options.take("autolearn_spam", float, 9.5),
        )
        if not 0.0 <= autolearn.ham_below <= default.tag:
            raise options.error("autolearn_ham", f"must be from 0 to the tag threshold ({default.tag:g})")
        if not default.quarantine <= autolearn.spam_above <= 10.0:
            raise options.error(
                "autolearn_spam", f"must be from the quarantine threshold ({default.quarantine:g}) to 10"
            )
        opened: list[ITokenStore] = []

        def store() -> ITokenStore:
            if not opened:  # at the first check, not when the chain is built
                opened.append(open_token_store(services.config, services.reactor))
            return opened[0]

        return cls(
            store,
            policy=Policy(default, overrides),
            subject_prefix=subject_prefix,
            header=header,
            header_on_clean=header_on_clean,
            min_training=min_training,
            autolearn=autolearn,
        )

    # --- the check ----------------------------------------------------------------

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        content = request.message
        if content is None:
            return CONTINUE
        parsed: Deferred[ParsedMessage] = content.parsed()
        recipients = [r.address for r in request.envelope.rcpt_to] if request.envelope else []

        def classify(message: ParsedMessage) -> Deferred[Verdict]:
            learned = sample(message, self.subject_prefix)
            looked_up: Deferred[TokenCounts] = self.store.counts(learned.tokens)
            return looked_up.addCallback(self._decide, learned, content, recipients)

        return parsed.addCallback(classify)

    def _decide(
        self, counts: TokenCounts, learned: Sample, content: MessageContent, recipients: list[str]
    ) -> Verdict:
        if counts.nspam < self.min_training or counts.nham < self.min_training:
            return self._untrained(counts)
        judgement = self.classifier.judge(counts.tokens, counts.nspam, counts.nham)
        score = round(judgement.score, 2)
        self._maybe_autolearn(score, learned, content)
        action = self.policy.action(score, recipients)
        headers = ((self.header, _header_value(score, judgement)),) if self.header else ()
        reason = f"Bayes score {score:.2f}"
        if action is Action.CONTINUE:
            if self.header_on_clean and headers:
                return Verdict(Action.TAG, reason, headers=headers)
            return CONTINUE
        if action is Action.TAG:
            return Verdict(
                Action.TAG, reason, score=score, headers=headers, subject_prefix=self.subject_prefix
            )
        return Verdict(action, reason, score=score, headers=headers)

    def _untrained(self, counts: TokenCounts) -> Verdict:
        note = (
            f"untrained ({counts.nspam} spam and {counts.nham} ham learned,"
            f" {self.min_training} of each needed)"
        )
        if not self.untrained_logged:
            self.untrained_logged = True
            log.info("bayes: {note}: no verdicts yet; train with: mailgatectl bayes train", note=note)
        if self.header_on_clean and self.header:
            return Verdict(Action.TAG, "Bayes untrained", headers=((self.header, note),))
        return CONTINUE

    # --- autolearning -------------------------------------------------------------

    def _maybe_autolearn(self, score: float, learned: Sample, content: MessageContent) -> None:
        if not self.autolearn.enabled:
            return
        if score < self.autolearn.ham_below:
            self._pending[content] = (learned, False)
        elif score > self.autolearn.spam_above:
            self._pending[content] = (learned, True)

    def message_accepted(self, request: Request, hits: Any, held: bool) -> None:
        self._settle(request, tuple(hits), queued_clean=not held)

    def message_refused(self, request: Request, hits: Any) -> None:
        self._settle(request, tuple(hits), queued_clean=False)

    def _settle(self, request: Request, hits: tuple[Hit, ...], *, queued_clean: bool) -> None:
        if request.message is None:
            return
        pending = self._pending.pop(request.message, None)
        if pending is None:
            return
        learned, spam = pending
        if not spam:
            others = [hit for hit in hits if hit.filter != self.name]
            if not queued_clean or judge(others, False) is not True:
                return  # someone else had doubts: not a ham to learn from
        done: Deferred[Any] = self.store.learn(learned.digest, learned.tokens, spam)
        done.addErrback(self._learn_failed, spam)

    def _learn_failed(self, failure: Failure, spam: bool) -> None:
        log.warn(
            "bayes: autolearning a {kind} failed: {error}",
            kind="spam" if spam else "ham",
            error=failure.getErrorMessage(),
        )


def _thresholds(options: Section, default: Thresholds) -> Thresholds:
    thresholds = Thresholds(
        options.take("tag", float, default.tag),
        options.take("quarantine", float, default.quarantine),
        options.take("delete", float, default.delete),
    )
    problem = thresholds.problem()
    if problem is not None:
        raise options.error("tag", problem)
    return thresholds


def _header_value(score: float, judgement: Judgement) -> str:
    # the score alone, so mail rules can compare it (Sieve's :value "ge")
    return f"{score:.2f}"
