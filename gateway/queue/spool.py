"""DirectorySpool: the durable queue, one directory per state (after Postfix).

The layout, the envelope file format and the crash-safety argument are in
docs/queue-format.rst. In short: ``spool/message/X/Y/<id>.eml`` holds the
message bytes for the message's whole life, behind a header with its first
envelope (a commit is one file); every later envelope, with the per-recipient
state, is a ``spool/<state>/X/Y/<id>.json`` file, and where that file sits *is*
the message's state. Every change goes through the group-commit writer
(`gateway.queue._committer`), so fsync never runs in the reactor thread.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger
from zope.interface import implementer

from gateway.interfaces import IIncomingMessage, ISpool
from gateway.model import Envelope, Quarantine, QueuedMessage, Session
from gateway.queue._committer import Disk, GroupCommitter, SpoolError
from gateway.queue._format import (
    EMBEDDED_STATES,
    EnvelopeFormatError,
    loads,
    open_message,
    placeholder,
)
from gateway.queue._headers import prefix_subject
from gateway.queue._ids import QueueIds, is_queue_id
from gateway.queue._layout import ENVELOPE_SUFFIX, MESSAGE_SUFFIX, MESSAGES, STATES, Layout
from gateway.queue._operations import (
    CommitOperation,
    RemoveOperation,
    Stored,
    UpdateOperation,
    first_envelope,
)
from gateway.queue._recovery import Recovery, RecoveryReport

__all__ = ["STATES", "DirectorySpool", "EnvelopeFormatError", "RecoveryReport", "SpoolError", "SpoolMessage"]

log = Logger(namespace="mailgate.spool")
T = TypeVar("T")

MEMORY_LIMIT = 256 * 1024  # bytes of a message kept in memory before it spills to tmp/
RESERVED = 8192  # bytes kept for the header in front of a message spilled to tmp/
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


@implementer(IIncomingMessage)
class SpoolMessage:
    """A message being received: in memory up to a limit, then in a file in tmp/."""

    def __init__(self, spool: DirectorySpool, queue_id: str, memory_limit: int) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._memory_limit = memory_limit
        self._chunks: list[bytes] = []
        self._spill: IO[bytes] | None = None
        self._finished = False
        self._first = -1  # the length of the first write: headers are inserted after it
        self._inserted = b""
        self._subject_prefix = ""

    def add_headers(self, data: bytes) -> None:
        self._inserted += data

    def prefix_subject(self, prefix: str) -> None:
        self._subject_prefix = prefix

    def open(self) -> IO[bytes]:
        if self._spill is None:
            return io.BytesIO(b"".join(self._chunks))
        try:
            self._spill.flush()
            handle = builtins.open(self._spool.layout.temp_message(self.queue_id), "rb")  # noqa: SIM115
            handle.seek(RESERVED)
            return handle
        except OSError as error:
            raise SpoolError.from_os("read", self._spool.layout.temp_message(self.queue_id), error) from None

    def write(self, data: bytes) -> None:
        if self._finished:
            raise SpoolError(f"spool: {self.queue_id}: write after commit or abort")
        if self._first < 0:
            self._first = len(data)
        self.size += len(data)
        if self._spill is not None:
            try:
                self._spill.write(data)  # buffered: a write(2) every 64 KiB, no fsync
            except OSError as error:
                raise SpoolError.from_os(
                    "write", self._spool.layout.temp_message(self.queue_id), error
                ) from None
            return
        self._chunks.append(bytes(data))
        if self.size > self._memory_limit:
            self._spill_to_disk()

    def _spill_to_disk(self) -> None:
        path = self._spool.layout.temp_message(self.queue_id)
        try:
            self._spool.disk.ensure_dir(self._spool.layout.temp)
            spill = os.fdopen(os.open(path, _O_NEW, 0o600), "wb", buffering=64 * 1024)
        except OSError as error:
            raise SpoolError.from_os("create", path, error) from None
        self._spill = spill
        try:
            spill.write(placeholder(RESERVED))  # the header is written there at commit
            spill.writelines(self._chunks)
        except OSError as error:
            raise SpoolError.from_os("write", path, error) from None
        finally:
            self._chunks = []

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
        hold = hold or quarantine is not None
        operation = CommitOperation(
            self._spool.layout,
            self.queue_id,
            self._chunks,
            self._spill,
            envelope,
            session,
            self._spool.now(),
            self.size,
            state="hold" if hold else "incoming",
            insert=(max(self._first, 0), self._inserted),
            edit=prefix_subject(self._subject_prefix) if self._subject_prefix else None,
            quarantine=quarantine,
            reserved=RESERVED if self._spill is not None else 0,
        )
        self._chunks, self._spill = [], None
        return self._spool._commit(operation)

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._chunks = []
        if self._spill is not None:
            spill, self._spill = self._spill, None
            with contextlib.suppress(OSError):
                spill.close()
            self._spool.disk.unlink(self._spool.layout.temp_message(self.queue_id))


@implementer(ISpool)
class DirectorySpool:
    """The durable spool in a directory tree; see docs/queue-format.rst."""

    def __init__(
        self,
        path: str,
        *,
        reactor: IReactorFromThreads,
        hash_levels: int = 2,
        writer_threads: int = 4,
        fsync: bool = True,
        memory_limit: int = MEMORY_LIMIT,
        now: Callable[[], float] | None = None,
        id_tag: int | None = None,
        remember_commits: bool = True,
        stop_with_reactor: bool = True,
    ) -> None:
        self.layout = Layout(path, hash_levels)
        self.disk = Disk(fsync=fsync)
        self.committer = GroupCommitter(reactor, self.disk, threads=writer_threads)
        self.memory_limit = memory_limit
        self.now: Callable[[], float] = now or time.time
        self.recovery: RecoveryReport | None = None  # set by recover()
        self._ids = QueueIds(id_tag)
        # an SMTP worker process only writes: another process delivers and removes
        self._remember_commits = remember_commits
        self._known: dict[str, Stored] = {}  # what this process wrote or read: no disk read needed
        self._corrupt: set[str] = set()
        self._damaged: set[str] = set()  # unreadable message file headers, reported once
        self._subscribers: list[Callable[[str], None]] = []
        self._queued_ops: dict[str, builtins.list[Callable[[], None]]] = {}
        self._lock_fd: int | None = None
        if stop_with_reactor and IReactorCore.providedBy(reactor):
            reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    # --- the way in ---------------------------------------------------------------

    def new_message(self) -> SpoolMessage:
        return SpoolMessage(self, self._ids.next(), self.memory_limit)

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(queue_id)` in the reactor after each commit; returns an unsubscriber."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _commit(self, operation: CommitOperation) -> Deferred[str]:
        return self.committer.submit(operation).addCallback(self._committed)

    def _committed(self, stored: Stored) -> str:
        queue_id = stored.message.queue_id
        if self._remember_commits:
            self._known[queue_id] = stored
        if stored.message.state == "hold":
            return queue_id  # nothing to deliver until an operator releases it
        for callback in builtins.list(self._subscribers):
            try:
                callback(queue_id)
            except Exception:
                log.failure("spool: {queue_id}: a commit subscriber failed", queue_id=queue_id)
        return queue_id

    # --- start and stop --------------------------------------------------------------

    def recover_now(self) -> int:
        """`recover`, done at once in this thread: at start, before anything else runs.

        The SMTP worker processes write into the spool too, so recovery (which
        deletes unfinished files) must be over before they start.
        """
        recovery = Recovery(self.layout, self._lock_fd)
        for phase in (recovery.prepare, recovery.publish):
            for directory in sorted(set(phase(self.disk))):
                self.disk.sync_dir(directory)
        return self._recovered(recovery.finish(self.disk))

    def recover(self) -> Deferred[int]:
        return self.committer.submit(Recovery(self.layout, self._lock_fd)).addCallback(self._recovered)

    def _recovered(self, recovery: Recovery) -> int:
        self._lock_fd = recovery.lock_fd
        self._known.update(recovery.stored)
        self._corrupt = recovery.corrupt_ids
        report = self.recovery = recovery.report
        log.info(
            "spool {root}: {messages} message(s), {requeued} requeued from active, "
            "{removed} unfinished file(s) removed, {corrupt} moved to corrupt",
            root=self.layout.root,
            messages=report.messages,
            requeued=report.requeued,
            removed=report.removed,
            corrupt=report.corrupt,
        )
        return report.requeued

    def stop(self) -> Deferred[None]:
        """Finish the pending writes, stop the writer threads and release the lock."""

        def stopped(_: None) -> None:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

        return self.committer.stop().addCallback(stopped)

    # --- reading ------------------------------------------------------------------

    def list(self, state: str) -> builtins.list[str]:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}; one of {', '.join(STATES)}")
        if state in EMBEDDED_STATES:  # also messages whose only envelope is their header
            return sorted(queue_id for queue_id, each in self.states().items() if each == state)
        return sorted(self._filed((state,)))

    def states(self) -> dict[str, str]:
        """Every message in the spool and its state, from one walk of the spool."""
        found = self._filed(STATES)
        for _, name in self.layout.files(MESSAGES):
            queue_id = name[: -len(MESSAGE_SUFFIX)]
            if name.endswith(MESSAGE_SUFFIX) and queue_id not in found and is_queue_id(queue_id):
                try:
                    found[queue_id] = self._stored(queue_id).message.state
                except KeyError:
                    pass  # removed meanwhile, or an unfinished commit of an older version
                except EnvelopeFormatError as error:
                    if queue_id not in self._damaged:  # recovery sets it aside at the next start
                        self._damaged.add(queue_id)
                        log.error(
                            "spool: {queue_id}: cannot read it: {error}", queue_id=queue_id, error=error
                        )
        return found

    def _filed(self, states: tuple[str, ...]) -> dict[str, str]:
        """The messages with an envelope file in these state directories, and where."""
        filed: dict[str, str] = {}
        for state in states:
            for _, name in self.layout.files(state):
                stem, _dot, suffix = name.rpartition(".")
                if "." + suffix in (ENVELOPE_SUFFIX, MESSAGE_SUFFIX) and is_queue_id(stem):
                    filed.setdefault(stem, state)
        return filed

    def load(self, queue_id: str) -> QueuedMessage:
        return self._stored(queue_id).message

    def find(self, queue_id: str) -> str:
        """The state a message is in (KeyError if unknown)."""
        if queue_id in self._corrupt:
            return "corrupt"
        return self.load(queue_id).state

    def message_path(self, queue_id: str) -> str:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        if queue_id in self._corrupt:
            return self.layout.corrupt_message(queue_id)
        return self.layout.message(queue_id)

    def message_bytes(self, queue_id: str) -> bytes:
        """The stored message (for tests and the operator's `queue show`)."""
        try:
            with open_message(self.message_path(queue_id)) as handle:
                return handle.read()
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def _stored(self, queue_id: str) -> Stored:
        stored = self._known.get(queue_id)
        if stored is not None:
            return stored
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        for state in STATES:
            path = self.layout.envelope(state, queue_id)
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                continue
            try:
                message, version, session = loads(data, state)
            except EnvelopeFormatError as error:
                raise EnvelopeFormatError(f"{path}: {error}") from None
            stored = Stored(message, version, session, file_state=state)
            if state != "corrupt":
                self._known[queue_id] = stored
            return stored
        stored = self._from_header(queue_id)
        self._known[queue_id] = stored
        return stored

    def _from_header(self, queue_id: str) -> Stored:
        """A message whose only envelope is its message file's header."""
        try:
            stored = first_envelope(self.layout.message(queue_id), queue_id)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        if stored is None:
            raise KeyError(queue_id)  # a message file without a header has its envelope in a state directory
        return stored

    # --- changes ----------------------------------------------------------------

    def update(self, message: QueuedMessage) -> Deferred[None]:
        if message.state not in STATES:
            return fail(ValueError(f"unknown queue state {message.state!r}"))

        def start() -> Deferred[None]:
            current = self._stored(message.queue_id)
            stored = Stored(message, current.version + 1, current.session)
            operation = UpdateOperation(self.layout, stored, current.file_state)
            return self.committer.submit(operation).addCallback(self._updated)

        return self._in_order(message.queue_id, start)

    def _updated(self, stored: Stored) -> None:
        queue_id = stored.message.queue_id
        self._known[queue_id] = stored
        if stored.message.state == "corrupt":
            self._corrupt.add(queue_id)
        else:
            self._corrupt.discard(queue_id)

    def remove(self, queue_id: str) -> Deferred[None]:
        if not is_queue_id(queue_id):
            return fail(KeyError(queue_id))

        def start() -> Deferred[None]:
            known = self._known.get(queue_id)
            if known is None or queue_id in self._corrupt:
                states: tuple[str, ...] = STATES
            else:
                states = (known.file_state,) if known.file_state is not None else ()
            operation = RemoveOperation(self.layout, queue_id, states)
            return self.committer.submit(operation).addCallback(self._removed, queue_id)

        return self._in_order(queue_id, start)

    def _removed(self, _: None, queue_id: str) -> None:
        self._known.pop(queue_id, None)
        self._corrupt.discard(queue_id)

    def _in_order(self, queue_id: str, start: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run `start` once the operations already under way for this message are done."""
        waiting = self._queued_ops.get(queue_id)
        if waiting is None:
            self._queued_ops[queue_id] = []
            try:
                result = start()
            except Exception as error:
                result = fail(error)
        else:
            result = Deferred()

            def go() -> None:
                try:
                    start().chainDeferred(result)
                except Exception as error:
                    result.errback(error)

            waiting.append(go)
        result.addBoth(self._next_op, queue_id)
        return result

    def _next_op(self, outcome: Any, queue_id: str) -> Any:
        waiting = self._queued_ops[queue_id]
        if waiting:
            waiting.pop(0)()
        else:
            del self._queued_ops[queue_id]
        return outcome
