"""Training: a raw message -> its tokens and digest -> learned as spam or ham.

`Trainer` is what the quarantine ("train as spam", "release as ham") and the
filter's autolearning use; `train(store, message, spam)` is the one-call form.
The digest that makes learning idempotent is taken from what does not change
when a message passes through gateways: its Message-ID, Date, From, Subject
(without our tag) and text, not the trace headers added on the way, so a
message trained from a mailbox and the same message in the quarantine are one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred

from gateway.bayes.store import ITokenStore, Learned
from gateway.bayes.tokenizer import DEFAULT_SUBJECT_PREFIX, tokenize
from gateway.content import ParsedMessage

__all__ = ["Sample", "Trainer", "message_digest", "sample", "train"]

Parse = Callable[[bytes], "ParsedMessage | Deferred[ParsedMessage]"]


def message_digest(message: ParsedMessage, subject_prefix: str = DEFAULT_SUBJECT_PREFIX) -> str:
    """A message's identity for learning (module docstring), as 32 hex digits."""
    subject = message.subject
    if subject_prefix and subject.startswith(subject_prefix):
        subject = subject[len(subject_prefix) :]
    parts = [
        *(value.strip() for value in message.header("Message-ID")[:1]),
        *(value.strip() for value in message.header("Date")[:1]),
        *(value.strip() for value in message.header("From")[:1]),
        subject.strip(),
        message.text,
        *(
            f"{a.filename}/{a.content_type}/{hashlib.sha256(a.payload).hexdigest()}"
            for a in message.attachments
        ),
    ]
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:32]


@attrs.frozen
class Sample:
    """A message ready to learn: its digest and its tokens."""

    digest: str
    tokens: frozenset[str]


def sample(message: ParsedMessage, subject_prefix: str = DEFAULT_SUBJECT_PREFIX) -> Sample:
    return Sample(message_digest(message, subject_prefix), tokenize(message, subject_prefix))


def _parse_message(raw: bytes) -> ParsedMessage:
    from gateway.content.parse import parse_message

    return parse_message(raw)


class Trainer:
    """Learns raw messages into a token store.

    `parse` turns raw bytes into a ParsedMessage, or a Deferred of one (the
    gateway passes one that parses off the reactor thread; the default parses
    in the caller's thread). `subject_prefix` is the subject tag the gateway
    adds, taken off before learning.
    """

    def __init__(
        self,
        store: ITokenStore,
        *,
        parse: Parse = _parse_message,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    ) -> None:
        self.store = store
        self.parse = parse
        self.subject_prefix = subject_prefix

    def sample(self, message: bytes) -> Deferred[Sample]:
        parsed: Deferred[Any] = maybeDeferred(self.parse, message)
        return parsed.addCallback(sample, self.subject_prefix)

    def train(self, message: bytes, spam: bool) -> Deferred[Learned]:
        """Learn a raw message as spam (True) or ham (False); relearns it if it was the other."""
        return self.sample(message).addCallback(
            lambda learned: self.store.learn(learned.digest, learned.tokens, spam)
        )

    def forget(self, message: bytes) -> Deferred[bool]:
        """Take a learned message out again; False if it was never learned."""
        return self.sample(message).addCallback(
            lambda learned: self.store.forget(learned.digest, learned.tokens)
        )


def train(store: ITokenStore, message: bytes, spam: bool) -> Deferred[Learned]:
    """Learn one raw message as spam or ham (`Trainer` with its defaults)."""
    return Trainer(store).train(message, spam)
