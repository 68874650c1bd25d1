"""SpamAssassin ("spamassassin"): each message is scored by spamd, and tagged or deleted by its score.

At the end of DATA the raw message goes to spamd (`gateway.scanners.spamd`,
SYMBOLS: the score and the names of the rules that hit). With the seed's
defaults:

- below `spam_score` (8): no opinion (CONTINUE); the score and rules are logged;
- from `spam_score`: TAG, the Subject gets `subject_prefix` (``SPAM*** ``) and an
  ``X-Mailgate-SpamAssassin: score=9.1 required=8 tests=RULE_A,RULE_B`` header;
- from `delete_score` (12): `delete_action`, DISCARD by default (or QUARANTINE, or
  REJECT: refused at the end of DATA, so the sender learns of it without a bounce).

The verdict's score is SpamAssassin's. SpamAssassin's own required score (its
``required_score``, 5 by default) is not used: our thresholds decide.

A message larger than `max_size` (500 KB, as spamc's default) is not sent; it
passes with "skipped: too large" in the log, as spamc and amavis do (large mail
is rarely spam, and spamd's time grows with size). spamd unreachable, too slow or
answering nonsense fails the check: the chain runner applies the filter's
``on_failure`` verdict (DEFER by default), never letting the message through as clean.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.filters import FilterServices, Request
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, Action, Stage, Verdict
from gateway.scanners._connection import client_endpoint
from gateway.scanners.spamd import SpamdClient, SpamdResult

log = Logger(namespace="mailgate.filter.spamassassin")

DELETE_ACTIONS = ("discard", "quarantine", "reject")
MAX_TESTS_SHOWN = 800  # characters of rule names in the header (a header line stays under 998)


@implementer(IFilter)
class SpamAssassin:
    """Scores messages with spamd; tags, or deletes, by the score (module docstring)."""

    name = "spamassassin"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        client: Any,
        *,
        spam_score: float = 8.0,
        delete_score: float = 12.0,
        delete_action: str = "discard",
        subject_prefix: str = "SPAM*** ",
        header: str = "X-Mailgate-SpamAssassin",
        max_size: int = 500 * 1024,
    ) -> None:
        """`client`: a `gateway.scanners.spamd.SpamdClient` (or anything with its `symbols`)."""
        self.client = client
        self.spam_score = spam_score
        self.delete_score = delete_score
        self.delete_action = delete_action
        self.subject_prefix = subject_prefix
        self.header = header
        self.max_size = max_size

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> SpamAssassin:
        server = options.take("server", str, "tcp:127.0.0.1:783")
        max_connections = options.positive("max_connections", 5)
        connect_timeout = options.positive_duration("connect_timeout", 5)
        scan_timeout = options.positive_duration("scan_timeout", 20)
        user = options.take("user", str, "")
        spam_score = options.take("spam_score", float, 8.0)
        delete_score = options.take("delete_score", float, 12.0)
        if delete_score < spam_score:
            raise options.error("delete_score", f"must not be below spam_score ({spam_score:g})")
        delete_action = options.choice("delete_action", DELETE_ACTIONS, "discard")
        subject_prefix = options.take("subject_prefix", str, "SPAM*** ")
        if "\r" in subject_prefix or "\n" in subject_prefix:
            raise options.error("subject_prefix", "must be on one line")
        header = options.take("header", str, "X-Mailgate-SpamAssassin")
        if not _header_name(header):
            raise options.error("header", f"{header!r} is not a header field name")
        max_size = options.size("max_size", 500 * 1024)
        if max_size < 1:
            raise options.error("max_size", "must be at least 1 byte")
        try:
            endpoint = client_endpoint(services.reactor, server)
        except ValueError as error:
            raise options.error("server", str(error)) from None
        try:
            client = SpamdClient(
                endpoint,
                services.reactor,
                address=server,
                max_connections=max_connections,
                connect_timeout=connect_timeout,
                timeout=scan_timeout,
                user=user or None,
            )
        except ValueError as error:
            raise options.error("user", str(error)) from None
        return cls(
            client,
            spam_score=spam_score,
            delete_score=delete_score,
            delete_action=delete_action,
            subject_prefix=subject_prefix,
            header=header,
            max_size=max_size,
        )

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        content = request.message
        if content is None:
            return CONTINUE
        if content.size > self.max_size:
            log.info(
                "spamassassin: skipped: too large ({size} bytes, max_size {max_size}) from=<{sender}>",
                size=content.size,
                max_size=self.max_size,
                sender=request.envelope.mail_from if request.envelope else "",
            )
            return CONTINUE
        answer: Deferred[SpamdResult] = self.client.symbols(content.read())
        return answer.addCallback(self._decide, request)

    def _decide(self, result: SpamdResult, request: Request) -> Verdict:
        tests = ",".join(result.symbols) or "none"
        if len(tests) > MAX_TESTS_SHOWN:
            tests = tests[:MAX_TESTS_SHOWN].rsplit(",", 1)[0] + ",..."
        summary = f"score={result.score:g} required={self.spam_score:g} tests={tests}"
        log.info(
            "spamassassin: {summary} from=<{sender}> [{peer}]",
            summary=summary,
            sender=request.envelope.mail_from if request.envelope else "",
            peer=request.session.peer_host,
        )
        if result.score < self.spam_score:
            return Verdict(Action.CONTINUE, f"SpamAssassin {summary}", score=result.score)
        if result.score >= self.delete_score:
            if self.delete_action == "reject":
                refusal = Verdict.reject(f"Message refused as spam (SpamAssassin score {result.score:g})")
                return attrs.evolve(refusal, score=result.score)
            action = Action.QUARANTINE if self.delete_action == "quarantine" else Action.DISCARD
            return Verdict(action, f"SpamAssassin {summary}", score=result.score)
        return Verdict(
            Action.TAG,
            f"SpamAssassin {summary}",
            score=result.score,
            headers=((self.header, summary),),
            subject_prefix=self.subject_prefix,
        )


def _header_name(name: str) -> bool:
    return bool(name) and all(33 <= ord(c) <= 126 and c != ":" for c in name)
