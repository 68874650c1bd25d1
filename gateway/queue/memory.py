"""MemorySpool: an ISpool kept in memory, for tests of the parts that use the spool.

It behaves as DirectorySpool does (the same contract tests run against both):
the same queue ids, states, versions of the rules (update moves between states,
recover requeues active messages, remove forgets), but its Deferreds fire at
once and nothing touches the disk unless `directory` is given, in which case
the message bytes are also written there (plain files, no fsync) so that a
transport under test can open `message_path()`.

Set `failure` to an exception to make commits and updates fail with it (a full
disk, say): the message is then not stored, as with the real spool.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import time
from collections.abc import Callable
from typing import IO

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from gateway.interfaces import IIncomingMessage, ISpool
from gateway.model import Envelope, Quarantine, QueuedMessage, RecipientState, Session
from gateway.queue._committer import SpoolError
from gateway.queue._headers import prefix_subject, rewrite_head
from gateway.queue._ids import QueueIds, is_queue_id
from gateway.queue._layout import STATES
from gateway.queue._operations import client_name

log = Logger(namespace="mailgate.spool")


@implementer(IIncomingMessage)
class MemoryMessage:
    """A message being received into a MemorySpool."""

    def __init__(self, spool: MemorySpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._chunks: list[bytes] = []
        self._finished = False
        self._inserted = b""
        self._subject_prefix = ""

    def add_headers(self, data: bytes) -> None:
        self._inserted += data

    def prefix_subject(self, prefix: str) -> None:
        self._subject_prefix = prefix

    def open(self) -> IO[bytes]:
        return io.BytesIO(b"".join(self._chunks))

    def write(self, data: bytes) -> None:
        if self._finished:
            raise SpoolError(f"spool: {self.queue_id}: write after commit or abort")
        self.size += len(data)
        self._chunks.append(bytes(data))

    def commit(
        self,
        envelope: Envelope,
        session: Session,
        hold: bool = False,
        quarantine: Quarantine | None = None,
    ) -> Deferred[str]:
        if self._finished:
            return fail(SpoolError(f"spool: {self.queue_id}: already committed or aborted"))
        self._finished = True
        chunks, self._chunks = self._chunks, []
        content = b"".join([*chunks[:1], self._inserted, *chunks[1:]])
        if self._subject_prefix:
            content = b"".join(rewrite_head([content], prefix_subject(self._subject_prefix)))
        return self._spool._commit(
            self.queue_id,
            content,
            envelope,
            session,
            hold=hold or quarantine is not None,
            quarantine=quarantine,
        )

    def abort(self) -> None:
        self._finished = True
        self._chunks = []


@implementer(ISpool)
class MemorySpool:
    """An ISpool in memory (see the module docstring)."""

    def __init__(self, *, directory: str | None = None, now: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.now = now
        self.failure: Exception | None = None
        self.messages: dict[str, QueuedMessage] = {}
        self.contents: dict[str, bytes] = {}
        self._ids = QueueIds()
        self._subscribers: list[Callable[[str], None]] = []

    def new_message(self) -> MemoryMessage:
        return MemoryMessage(self, self._ids.next())

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _commit(
        self,
        queue_id: str,
        content: bytes,
        envelope: Envelope,
        session: Session,
        *,
        hold: bool = False,
        quarantine: Quarantine | None = None,
    ) -> Deferred[str]:
        if self.failure is not None:
            return fail(self.failure)
        self.contents[queue_id] = content
        if self.directory is not None:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(self.message_path(queue_id), "wb") as handle:
                handle.write(content)
        self.messages[queue_id] = QueuedMessage(
            queue_id=queue_id,
            envelope=envelope,
            recipients=tuple(RecipientState(r) for r in envelope.rcpt_to),
            arrived=self.now(),
            size=len(content),
            client=client_name(session),
            state="hold" if hold else "incoming",
            quarantine=quarantine,
        )
        if hold:
            return succeed(queue_id)  # nothing to deliver until an operator releases it
        for callback in builtins.list(self._subscribers):
            try:
                callback(queue_id)
            except Exception:
                log.failure("spool: {queue_id}: a commit subscriber failed", queue_id=queue_id)
        return succeed(queue_id)

    def recover(self) -> Deferred[int]:
        requeued = 0
        for queue_id, message in self.messages.items():
            if message.state == "active":
                self.messages[queue_id] = attrs.evolve(message, state="incoming")
                requeued += 1
        return succeed(requeued)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def list(self, state: str) -> builtins.list[str]:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}; one of {', '.join(STATES)}")
        return sorted(queue_id for queue_id, message in self.messages.items() if message.state == state)

    def states(self) -> dict[str, str]:
        return {queue_id: message.state for queue_id, message in self.messages.items()}

    def load(self, queue_id: str) -> QueuedMessage:
        return self.messages[queue_id]

    def find(self, queue_id: str) -> str:
        return self.messages[queue_id].state

    def update(self, message: QueuedMessage) -> Deferred[None]:
        if message.state not in STATES:
            return fail(ValueError(f"unknown queue state {message.state!r}"))
        if message.queue_id not in self.messages:
            return fail(KeyError(message.queue_id))
        if self.failure is not None:
            return fail(self.failure)
        self.messages[message.queue_id] = message
        return succeed(None)

    def remove(self, queue_id: str) -> Deferred[None]:
        if not is_queue_id(queue_id):
            return fail(KeyError(queue_id))
        self.messages.pop(queue_id, None)
        self.contents.pop(queue_id, None)
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.message_path(queue_id))
        return succeed(None)

    def message_path(self, queue_id: str) -> str:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        return os.path.join(self.directory or "/nonexistent/memory-spool", queue_id + ".eml")

    def message_bytes(self, queue_id: str) -> bytes:
        return self.contents[queue_id]
