"""The spool's changes as group-commit Operations: commit, update, remove.

Each runs in a writer thread (see `_committer`). The order of the steps is the
crash-safety argument of docs/queue-format.rst: data files are fsync'ed before
they are renamed into place, the message is durable (file and directory entry)
before its envelope appears in a state directory, and a removal unlinks the
envelope before the message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import attrs

from gateway.model import Envelope, Quarantine, QueuedMessage, RecipientState, Session
from gateway.queue._committer import Disk, SpoolError
from gateway.queue._format import dumps, session_fields
from gateway.queue._headers import rewrite_head
from gateway.queue._layout import Layout


@attrs.frozen
class Stored:
    """What the spool knows of a message it wrote or read: the envelope file's content."""

    message: QueuedMessage
    version: int
    session: dict[str, Any] | None = None


def _copy(source: IO[bytes], first: tuple[bytes, ...], size: int = 1 << 20) -> Iterator[bytes]:
    """`first`, then the rest of `source` in pieces (a message may be 100 MB)."""
    yield from first
    while piece := source.read(size):
        yield piece


def client_name(session: Session) -> str:
    # Postfix's "name[address]"; there is no verified name here, and HELO is not one
    return f"unknown[{session.peer_host}]"


class CommitOperation:
    """A new message: message file into message/, then its envelope into incoming/."""

    def __init__(
        self,
        layout: Layout,
        queue_id: str,
        chunks: list[bytes],
        spill: IO[bytes] | None,
        envelope: Envelope,
        session: Session,
        arrived: float,
        size: int,
        *,
        state: str = "incoming",
        insert: tuple[int, bytes] = (0, b""),
        edit: Callable[[bytes], bytes] | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.state = state  # "incoming", or "hold" for a message a filter held
        self.insert = insert  # (offset, header lines): end-of-data filters' headers
        self.edit = edit  # a change to the header section (the Subject tag), or None
        self.quarantine = quarantine
        size += len(insert[1])
        self.layout = layout
        self.queue_id = queue_id
        self.chunks = chunks
        self.spill = spill
        self.envelope = envelope
        self.session = session
        self.arrived = arrived
        self.size = size
        self._made: list[str] = []  # files this operation created, for undo

    def _edited(self, pieces: Iterable[bytes]) -> Iterable[bytes]:
        if self.edit is None:
            return pieces
        return self._counted(rewrite_head(pieces, self.edit))

    def _counted(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """The pieces, with `size` set to their total once they are all written."""
        total = 0
        for piece in pieces:
            total += len(piece)
            yield piece
        self.size = total

    def prepare(self, disk: Disk) -> Iterable[str]:
        layout, queue_id = self.layout, self.queue_id
        temp = layout.temp_message(queue_id)
        self._made.append(temp)
        offset, inserted = self.insert
        if self.spill is not None:
            spill, self.spill = self.spill, None
            try:
                spill.flush()
                if inserted or self.edit is not None:
                    # a big message already on disk: copy it around the new header lines
                    self._made.append(temp + ".h")
                    with open(temp, "rb") as written:
                        head = written.read(offset)
                        pieces = _copy(written, (head, inserted))
                        disk.write_file(temp + ".h", self._edited(pieces))
                    disk.rename(temp + ".h", temp)
                else:
                    disk.sync_file(spill.fileno(), temp)
            except OSError as error:
                raise SpoolError.from_os("write", temp, error) from None
            finally:
                spill.close()
        else:
            chunks = self.chunks
            if inserted:
                chunks = [*chunks[:1], inserted, *chunks[1:]]  # the first write is the first chunk
            disk.write_file(temp, self._edited(chunks))
        self.chunks = []
        directory = layout.message_dir(queue_id)
        disk.ensure_dir(directory)
        final = layout.message(queue_id)
        disk.rename(temp, final)
        self._made.append(final)
        self.stored = Stored(
            QueuedMessage(
                queue_id=queue_id,
                envelope=self.envelope,
                recipients=tuple(RecipientState(r) for r in self.envelope.rcpt_to),
                arrived=self.arrived,
                size=self.size,
                client=client_name(self.session),
                state=self.state,
                quarantine=self.quarantine,
            ),
            1,
            session_fields(self.session),
        )
        self._temp_envelope = layout.temp_envelope(queue_id, 1)
        self._made.append(self._temp_envelope)
        disk.write_file(self._temp_envelope, [dumps(self.stored.message, 1, self.stored.session)])
        return (directory,)

    def publish(self, disk: Disk) -> Iterable[str]:
        directory = self.layout.envelope_dir(self.state, self.queue_id)
        disk.ensure_dir(directory)
        final = self.layout.envelope(self.state, self.queue_id)
        disk.rename(self._temp_envelope, final)
        self._made.append(final)
        return (directory,)

    def finish(self, disk: Disk) -> Stored:
        return self.stored

    def undo(self, disk: Disk) -> None:
        if self.spill is not None:
            self.spill.close()
        for path in reversed(self._made):  # the envelope first
            disk.unlink(path)


class UpdateOperation:
    """A rewritten envelope file, moved to the message's (new) state directory."""

    def __init__(self, layout: Layout, stored: Stored, old_state: str) -> None:
        self.layout = layout
        self.stored = stored
        self.old_state = old_state
        self._temp = layout.temp_envelope(stored.message.queue_id, stored.version)
        self._moved_to: str | None = None

    def prepare(self, disk: Disk) -> Iterable[str]:
        disk.write_file(self._temp, [dumps(self.stored.message, self.stored.version, self.stored.session)])
        return ()

    def publish(self, disk: Disk) -> Iterable[str]:
        message = self.stored.message
        directory = self.layout.envelope_dir(message.state, message.queue_id)
        disk.ensure_dir(directory)
        final = self.layout.envelope(message.state, message.queue_id)
        disk.rename(self._temp, final)
        if message.state != self.old_state:
            self._moved_to = final
        return (directory,)

    def finish(self, disk: Disk) -> Stored:
        if self.old_state != self.stored.message.state:
            # not synced: after a crash the older copy loses on its version
            disk.unlink(self.layout.envelope(self.old_state, self.stored.message.queue_id))
        return self.stored

    def undo(self, disk: Disk) -> None:
        disk.unlink(self._temp)
        if self._moved_to is not None:
            disk.unlink(self._moved_to)  # the old copy is still in place


class RemoveOperation:
    """A deleted message: the envelope(s) first, then the message file."""

    def __init__(self, layout: Layout, queue_id: str, states: Iterable[str]) -> None:
        self.layout = layout
        self.queue_id = queue_id
        self.states = tuple(states)

    def prepare(self, disk: Disk) -> Iterable[str]:
        for state in self.states:
            disk.unlink(self.layout.envelope(state, self.queue_id))
        disk.unlink(self.layout.message(self.queue_id))
        if "corrupt" in self.states:
            disk.unlink(self.layout.corrupt_message(self.queue_id))
        return ()

    def publish(self, disk: Disk) -> Iterable[str]:
        return ()

    def finish(self, disk: Disk) -> None:
        return None

    def undo(self, disk: Disk) -> None:
        return None
