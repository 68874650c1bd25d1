"""The spool's changes as group-commit Operations: commit, update, remove.

Each runs in a writer thread (see `_committer`). The order of the steps is the
crash-safety argument of docs/queue-format.rst: a file is fsync'ed before it is
renamed into place; a commit is one file, the message behind its first
envelope; a removal unlinks the message file, and only once that is durable
the envelope files of later versions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import IO, Any

import attrs

from gateway.model import Envelope, Quarantine, QueuedMessage, RecipientState, Session
from gateway.queue._committer import Disk, SpoolError
from gateway.queue._format import (
    EnvelopeFormatError,
    dumps,
    header,
    loads,
    placeholder,
    read_header,
    session_fields,
)
from gateway.queue._headers import rewrite_head
from gateway.queue._layout import Layout


@attrs.frozen
class Stored:
    """What the spool knows of a message it wrote or read: the envelope file's content."""

    message: QueuedMessage
    version: int
    session: dict[str, Any] | None = None
    # the state directory holding the envelope file; None while the only
    # envelope is the header of the message file (version 1)
    file_state: str | None = None


def first_envelope(path: str, queue_id: str) -> Stored | None:
    """The envelope in the header of message file `path`; None if it has no header.

    EnvelopeFormatError (naming the file) if the header is damaged or names
    another id; OSError if the file cannot be read.
    """
    with open(path, "rb") as handle:
        document = read_header(handle)
    if document is None:
        return None
    try:
        message, version, session = loads(document, None)
        if message.queue_id != queue_id:
            raise EnvelopeFormatError(f"it names another queue id, {message.queue_id}")
    except EnvelopeFormatError as error:
        raise EnvelopeFormatError(f"{path}: {error}") from None
    return Stored(message, version, session)


def _copy(source: IO[bytes], first: tuple[bytes, ...], size: int = 1 << 20) -> Iterator[bytes]:
    """`first`, then the rest of `source` in pieces (a message may be 100 MB)."""
    yield from first
    while piece := source.read(size):
        yield piece


def client_name(session: Session) -> str:
    # Postfix's "name[address]"; there is no verified name here, and HELO is not one
    return f"unknown[{session.peer_host}]"


class CommitOperation:
    """A new message: one file, its first envelope in front of the message, into message/."""

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
        reserved: int = 0,
    ) -> None:
        self.state = state  # "incoming", or "hold" for a message a filter held
        self.insert = insert  # (offset, header lines): end-of-data filters' headers
        self.edit = edit  # a change to the header section (the Subject tag), or None
        self.quarantine = quarantine
        self.reserved = reserved  # bytes in front of a spilled message kept for the header
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

    def _stored(self) -> Stored:
        return Stored(
            QueuedMessage(
                queue_id=self.queue_id,
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

    def _header(self, reserve: int = 0) -> bytes | None:
        self.stored = self._stored()
        return header(self.stored.message, self.stored.session, reserve)

    def _fitted(self, room: int) -> bytes:
        made = self._header(room)
        if made is None:
            raise SpoolError(f"spool: {self.queue_id}: the envelope outgrew the room kept for it")
        return made

    def _exact_header(self) -> bytes:
        made = self._header()
        assert made is not None
        return made

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
                fitted = None
                if not inserted and self.edit is None:
                    fitted = self._header(self.reserved)
                if fitted is not None:
                    # the header goes into the space kept for it at the start
                    disk.write_at_start(spill.fileno(), fitted)
                    disk.sync_file(spill.fileno(), temp)
                else:
                    # copy the message around its new header lines, behind a header of its own
                    self._made.append(temp + ".h")
                    with open(temp, "rb") as written:
                        written.seek(self.reserved)
                        head = written.read(offset)
                        pieces = self._edited(_copy(written, (head, inserted)))
                        room = len(self._exact_header()) + 64  # the size may still grow a few digits
                        with_room = chain((placeholder(room),), pieces)
                        disk.write_file(temp + ".h", with_room, lambda: self._fitted(room))
                    disk.rename(temp + ".h", temp)
            except OSError as error:
                raise SpoolError.from_os("write", temp, error) from None
            finally:
                spill.close()
        else:
            chunks = self.chunks
            if inserted:
                chunks = [*chunks[:1], inserted, *chunks[1:]]  # the first write is the first chunk
            if self.edit is not None:
                chunks = list(self._edited(chunks))  # the size is in the header
            disk.write_file(temp, [self._exact_header(), *chunks])
        self.chunks = []
        directory = layout.message_dir(queue_id)
        disk.ensure_dir(directory)
        disk.rename(temp, layout.message(queue_id))
        self._made.append(layout.message(queue_id))
        return (directory,)

    def publish(self, disk: Disk) -> Iterable[str]:
        return ()

    def finish(self, disk: Disk) -> Stored:
        return self.stored

    def undo(self, disk: Disk) -> None:
        if self.spill is not None:
            self.spill.close()
        for path in reversed(self._made):
            disk.unlink(path)


class UpdateOperation:
    """A rewritten envelope file, moved to the message's (new) state directory."""

    def __init__(self, layout: Layout, stored: Stored, old_state: str | None) -> None:
        """`old_state`: the directory of the envelope file in force, None for the message file's header."""
        self.layout = layout
        self.stored = attrs.evolve(stored, file_state=stored.message.state)
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
        if self.old_state is not None and self.old_state != self.stored.message.state:
            # not synced: after a crash the older copy loses on its version
            disk.unlink(self.layout.envelope(self.old_state, self.stored.message.queue_id))
        return self.stored

    def undo(self, disk: Disk) -> None:
        disk.unlink(self._temp)
        if self._moved_to is not None:
            disk.unlink(self._moved_to)  # the old copy is still in force


class RemoveOperation:
    """A deleted message: its message file, then (once that is durable) its envelope files."""

    def __init__(self, layout: Layout, queue_id: str, states: Iterable[str]) -> None:
        """`states`: the state directories that may hold an envelope file of it."""
        self.layout = layout
        self.queue_id = queue_id
        self.states = tuple(states)

    def prepare(self, disk: Disk) -> Iterable[str]:
        disk.unlink(self.layout.message(self.queue_id))
        if "corrupt" in self.states:
            disk.unlink(self.layout.corrupt_message(self.queue_id))
        # the message file's removal is made durable first: were it to come
        # back after a crash without the envelope files, its header (version
        # 1) would deliver it again, also to the recipients already done
        return (self.layout.message_dir(self.queue_id),) if self.states else ()

    def publish(self, disk: Disk) -> Iterable[str]:
        for state in self.states:
            disk.unlink(self.layout.envelope(state, self.queue_id))
        return ()

    def finish(self, disk: Disk) -> None:
        return None

    def undo(self, disk: Disk) -> None:
        return None
