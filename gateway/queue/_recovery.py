"""Start-up recovery of a spool directory, run once in a writer thread.

- create the spool (mode 0700) and its top directories if missing, take the lock;
- delete everything in tmp/ (files being written when the process died);
- read every envelope file: an unreadable or unparseable one goes to corrupt/
  with its message (never deleted); one whose message file is gone is what a
  removal cut short leaves (the message file goes first): it is deleted;
- of two copies of an envelope (a crash in the middle of a move) keep the
  higher version;
- move what was in active/ back to incoming/;
- read the header of every message file that has no envelope file: its first
  envelope puts it in incoming or hold; a damaged header sends it to corrupt/;
  a message file without a header and without an envelope file (written by a
  version that kept the first envelope apart, and never committed) is deleted.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable

import attrs
from twisted.logger import Logger

from gateway.queue._committer import Disk, SpoolError
from gateway.queue._format import EnvelopeFormatError, loads
from gateway.queue._ids import is_queue_id
from gateway.queue._layout import (
    ENVELOPE_SUFFIX,
    MESSAGE_SUFFIX,
    MESSAGES,
    STATES,
    TEMP,
    Layout,
)
from gateway.queue._operations import Stored, first_envelope

log = Logger(namespace="mailgate.spool")


@attrs.frozen
class RecoveryReport:
    """What recovery found and did."""

    messages: int  # messages in the spool after recovery (corrupt ones not counted)
    requeued: int  # moved from active back to incoming
    removed: int  # temporary and half-written files deleted
    corrupt: int  # envelopes (with their messages) moved to corrupt/


class Recovery:
    """One recovery pass; `prepare` does the work (it is an Operation)."""

    def __init__(self, layout: Layout, lock_fd: int | None) -> None:
        self.layout = layout
        self.lock_fd = lock_fd
        self.stored: dict[str, Stored] = {}
        self.corrupt_ids: set[str] = set()
        self._dirty: set[str] = set()
        self._requeued = self._removed = self._corrupt = 0

    def prepare(self, disk: Disk) -> Iterable[str]:
        layout = self.layout
        disk.ensure_dir(layout.root)
        for top in (TEMP, MESSAGES, *STATES):
            disk.ensure_dir(layout.top(top))
        self._lock()
        for entry in os.scandir(layout.temp):
            if disk.unlink(entry.path):
                self._removed += 1
        places: dict[str, str] = {}  # queue id -> path of the copy kept
        for state in STATES[:-1]:
            for directory, name in layout.files(state):
                self._examine(disk, state, directory, name, places)
        for queue_id, stored in list(self.stored.items()):
            if stored.message.state == "active":
                self._requeue(disk, stored, places[queue_id])
        for _directory, name in layout.files("corrupt"):
            self.corrupt_ids.add(name.rsplit(".", 1)[0])
        for directory, name in layout.files(MESSAGES):
            queue_id = name[: -len(MESSAGE_SUFFIX)]
            if (
                name.endswith(MESSAGE_SUFFIX)
                and is_queue_id(queue_id)
                and queue_id not in self.stored
                and queue_id not in self.corrupt_ids
            ):
                self._examine_message(disk, queue_id, os.path.join(directory, name))
        return sorted(self._dirty)

    def publish(self, disk: Disk) -> Iterable[str]:
        return ()

    def finish(self, disk: Disk) -> Recovery:
        return self

    def undo(self, disk: Disk) -> None:
        return None

    @property
    def report(self) -> RecoveryReport:
        return RecoveryReport(len(self.stored), self._requeued, self._removed, self._corrupt)

    def _lock(self) -> None:
        if self.lock_fd is not None:
            return  # this process holds it already
        path = self.layout.lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as error:
            raise SpoolError.from_os("open", path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"spool: {self.layout.root} is in use by another process (lock {path})", path
            ) from None
        self.lock_fd = fd

    def _examine(self, disk: Disk, state: str, directory: str, name: str, places: dict[str, str]) -> None:
        path = os.path.join(directory, name)
        queue_id = name[: -len(ENVELOPE_SUFFIX)]
        if not name.endswith(ENVELOPE_SUFFIX) or not is_queue_id(queue_id):
            log.warn("spool: leaving a stray file alone: {path}", path=path)
            return
        try:
            with open(path, "rb") as handle:
                message, version, session = loads(handle.read(), state)
            if message.queue_id != queue_id:
                raise EnvelopeFormatError(f"it names another queue id, {message.queue_id}")
        except (OSError, EnvelopeFormatError) as error:
            self._to_corrupt(disk, queue_id, path, str(error))
            return
        if not os.path.exists(self.layout.message(queue_id)):
            log.info("spool: {queue_id}: finishing a removal: deleting {path}", queue_id=queue_id, path=path)
            disk.unlink(path)
            self._dirty.add(directory)
            self._removed += 1
            return
        kept = self.stored.get(queue_id)
        if kept is not None and kept.version >= version:
            disk.unlink(path)  # an older copy left by a move
            self._dirty.add(directory)
            return
        if kept is not None:
            disk.unlink(places[queue_id])
            self._dirty.add(os.path.dirname(places[queue_id]))
        self.stored[queue_id] = Stored(message, version, session, file_state=state)
        places[queue_id] = path

    def _examine_message(self, disk: Disk, queue_id: str, path: str) -> None:
        """A message file with no envelope file: its header holds its first envelope."""
        try:
            stored = first_envelope(path, queue_id)
        except (OSError, EnvelopeFormatError) as error:
            self._to_corrupt(disk, queue_id, path, str(error))
            return
        if stored is None:
            log.info("spool: removing {path}: no envelope", path=path)
            if disk.unlink(path):
                self._removed += 1
            return
        self.stored[queue_id] = stored

    def _to_corrupt(self, disk: Disk, queue_id: str, path: str, reason: str) -> None:
        log.error(
            "spool: {queue_id}: moving to corrupt/: {path}: {reason}",
            queue_id=queue_id,
            path=path,
            reason=reason,
        )
        directory = self.layout.envelope_dir("corrupt", queue_id)
        disk.ensure_dir(directory)
        message = self.layout.message(queue_id)
        if path != message:  # else the damage is in the message file's header
            disk.rename(path, self.layout.envelope("corrupt", queue_id))
        if os.path.exists(message):
            disk.rename(message, self.layout.corrupt_message(queue_id))
            self._dirty.add(os.path.dirname(message))
        self._dirty.update((directory, os.path.dirname(path)))
        self.corrupt_ids.add(queue_id)
        self._corrupt += 1

    def _requeue(self, disk: Disk, stored: Stored, path: str) -> None:
        queue_id = stored.message.queue_id
        directory = self.layout.envelope_dir("incoming", queue_id)
        disk.ensure_dir(directory)
        disk.rename(path, self.layout.envelope("incoming", queue_id))
        self._dirty.update((directory, os.path.dirname(path)))
        self.stored[queue_id] = attrs.evolve(
            stored, message=attrs.evolve(stored.message, state="incoming"), file_state="incoming"
        )
        self._requeued += 1
