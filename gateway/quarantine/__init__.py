"""The quarantine: messages a filter held, kept with why, until an administrator decides.

A quarantined message sits in the spool's ``hold`` state with a `Quarantine`
record in its envelope file (the filters that spoke, their reasons and scores):
one store for inbound and outbound, as durable as the queue, and a release is
the queue's own release, so the message is delivered without running the
filters again. `QuarantineRoom` is what the control socket, the expiry timer and
the daily notice use; operator holds (``mailgatectl queue hold``) have no record
and are not shown here.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from gateway.interfaces import ISpool
from gateway.model import QueuedMessage
from gateway.queue import open_message

__all__ = ["QuarantineRoom", "Selection"]

log = Logger(namespace="mailgate.quarantine")

HEAD_READ = 64 * 1024  # bytes read from a message for its header fields


@attrs.frozen
class Selection:
    """Which quarantined messages a listing wants (every condition given must hold)."""

    since: float | None = None
    until: float | None = None
    recipient: str = ""  # a substring of a recipient address, case-insensitive
    reason: str = ""  # a substring of the reason or of a filter's name, case-insensitive
    kind: str = ""  # "quarantine" or "rejected"; "" for both

    def matches(self, message: QueuedMessage) -> bool:
        record = message.quarantine
        if record is None:
            return False
        if self.since is not None and message.arrived < self.since:
            return False
        if self.until is not None and message.arrived >= self.until:
            return False
        if self.kind and record.kind != self.kind:
            return False
        if self.recipient:
            wanted = self.recipient.lower()
            if not any(wanted in r.recipient.address.lower() for r in message.recipients):
                return False
        if self.reason:
            wanted = self.reason.lower()
            texts = [record.reason, *(f"{hit[0]} {hit[2]}" for hit in record.hits)]
            if not any(wanted in text.lower() for text in texts):
                return False
        return True


class QuarantineRoom:
    """List, show, release, delete, train and expire quarantined messages."""

    def __init__(
        self,
        spool: ISpool,
        manager: Any,
        *,
        retention: float = 30 * 86400.0,
        trainer: Callable[[bytes, bool], Deferred[Any]] | None = None,
    ) -> None:
        """`manager` is the queue manager (release and delete go through it, so a
        message in delivery is never pulled from under it); `trainer(message, spam)`
        teaches the Bayes classifier."""
        self.spool = spool
        self.manager = manager
        self.retention = retention
        self.trainer = trainer

    # --- looking -------------------------------------------------------------------

    def messages(self, selection: Selection = Selection()) -> list[QueuedMessage]:
        """Quarantined messages matching `selection`, oldest first."""
        found = []
        for queue_id in self.spool.list("hold"):
            try:
                message = self.spool.load(queue_id)
            except (KeyError, OSError, ValueError):
                continue  # gone meanwhile, or corrupt (the queue commands show those)
            if selection.matches(message):
                found.append(message)
        return sorted(found, key=lambda m: (m.arrived, m.queue_id))

    def head(self, queue_id: str) -> dict[str, str]:
        """A few header fields of a message (From, Subject, Date, Message-ID), decoded."""
        try:
            with open_message(self.spool.message_path(queue_id)) as handle:
                head = handle.read(HEAD_READ)
        except OSError:
            return {}
        end = head.find(b"\r\n\r\n")
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            head if end < 0 else head[: end + 4]
        )
        fields = {}
        for name in ("From", "Subject", "Date", "Message-ID"):
            try:
                value = parsed.get(name)
            except Exception:  # a header broken beyond what the policy repairs
                value = None
            if value is not None:
                fields[name.lower()] = " ".join(str(value).split())
        return fields

    def row(self, message: QueuedMessage) -> dict[str, Any]:
        """One message as the control socket reports it."""
        record = message.quarantine
        assert record is not None
        return {
            "queue_id": message.queue_id,
            "arrived": message.arrived,
            "size": message.size,
            "sender": message.envelope.mail_from,
            "recipients": [r.recipient.address for r in message.recipients],
            "kind": record.kind,
            "direction": record.direction,
            "reason": record.reason,
            "score": record.score,
            "hits": [
                {"filter": name, "action": action, "reason": reason, "score": score}
                for name, action, reason, score in record.hits
            ],
            **self.head(message.queue_id),
        }

    def load(self, queue_id: str) -> QueuedMessage:
        """The quarantined message `queue_id`; KeyError if the quarantine has no such message."""
        message = self.spool.load(queue_id)
        if message.state != "hold" or message.quarantine is None:
            raise KeyError(f"{queue_id} is not in the quarantine")
        return message

    def raw(self, queue_id: str) -> bytes:
        self.load(queue_id)
        with open_message(self.spool.message_path(queue_id)) as handle:
            return handle.read()

    # --- deciding -------------------------------------------------------------------

    def release(self, queue_id: str) -> Deferred[str]:
        """Deliver it, without running the filters again."""
        message = self.load(queue_id)
        log.info(
            "{queue_id}: released from the quarantine (was: {reason})",
            queue_id=queue_id,
            reason=message.quarantine.reason if message.quarantine else "",
        )
        released: Deferred[Any] = self.manager.release(queue_id)
        return released.addCallback(lambda _: queue_id)

    def delete(self, queue_id: str) -> Deferred[str]:
        self.load(queue_id)
        log.info("{queue_id}: deleted from the quarantine", queue_id=queue_id)
        deleted: Deferred[Any] = self.manager.delete(queue_id)
        return deleted.addCallback(lambda _: queue_id)

    def train(self, queue_id: str, spam: bool) -> Deferred[str]:
        """Teach Bayes: spam is then deleted, ham (a false positive) released."""
        if self.trainer is None:
            raise ValueError('there is no Bayes classifier to train (no "bayes" filter configured)')
        content = self.raw(queue_id)
        learned = self.trainer(content, spam)

        def then(_: object) -> Deferred[str]:
            log.info(
                "{queue_id}: learned as {kind} by Bayes", queue_id=queue_id, kind="spam" if spam else "ham"
            )
            return self.delete(queue_id) if spam else self.release(queue_id)

        return learned.addCallback(then)

    def expire(self, now: float) -> Deferred[int]:
        """Delete what has been quarantined longer than the retention time."""
        old = self.messages(Selection(until=now - self.retention))
        if not old:
            return succeed(0)
        for message in old:
            log.info(
                "{queue_id}: expired from the quarantine after {days:g} days",
                queue_id=message.queue_id,
                days=self.retention / 86400,
            )
        done: list[Deferred[Any]] = [self.manager.delete(message.queue_id) for message in old]
        from twisted.internet.defer import gatherResults

        return gatherResults(done, consumeErrors=True).addCallback(lambda _: len(old))
