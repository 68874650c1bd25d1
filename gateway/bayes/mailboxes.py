"""Messages to train from: mbox files, Maildirs, single .eml files and directories of them.

`find_sources(paths)` says what each path is (and fails, in one line, for a
path that is not there); `count` and `messages` read them. A Maildir is a
directory with ``cur`` and ``new`` (both are read; ``tmp`` holds half-delivered
mail and is not); an mbox is a file whose first line starts with ``From ``;
any other file is one message; any other directory is searched for those,
hidden files left out.
"""

from __future__ import annotations

import mailbox
import os
from collections.abc import Iterable, Iterator

import attrs

__all__ = ["MailboxError", "Source", "count", "find_sources", "messages"]


class MailboxError(Exception):
    """A path to train from that is missing or unreadable."""


@attrs.frozen
class Source:
    """One place messages come from."""

    path: str
    kind: str  # "mbox", "maildir" or "file"


def find_sources(paths: Iterable[str]) -> list[Source]:
    """What each path holds; directories are walked (sorted, for repeatable training)."""
    found: list[Source] = []
    for path in paths:
        if not os.path.exists(path):
            raise MailboxError(f"{path}: no such file or directory")
        if os.path.isdir(path):
            found.extend(_directory(path))
        else:
            found.append(Source(path, _file_kind(path)))
    return found


def _directory(path: str) -> Iterator[Source]:
    if os.path.isdir(os.path.join(path, "cur")) and os.path.isdir(os.path.join(path, "new")):
        yield Source(path, "maildir")
        return
    try:
        names = sorted(os.listdir(path))
    except OSError as error:
        raise MailboxError(f"{path}: {error.strerror}") from None
    for name in names:
        if name.startswith("."):
            continue
        child = os.path.join(path, name)
        if os.path.isdir(child):
            yield from _directory(child)
        elif os.path.isfile(child):
            yield Source(child, _file_kind(child))


def _file_kind(path: str) -> str:
    try:
        with open(path, "rb") as stream:
            start = stream.read(5)
    except OSError as error:
        raise MailboxError(f"{path}: {error.strerror}") from None
    return "mbox" if start == b"From " else "file"


def count(sources: Iterable[Source]) -> int:
    """How many messages the sources hold (an mbox is scanned for its From lines)."""
    total = 0
    for source in sources:
        if source.kind == "file":
            total += 1
        elif source.kind == "maildir":
            total += sum(len(_listing(os.path.join(source.path, sub))) for sub in ("cur", "new"))
        else:
            with open(source.path, "rb") as stream:
                total += sum(1 for line in stream if line.startswith(b"From "))
    return total


def _listing(path: str) -> list[str]:
    return [name for name in os.listdir(path) if not name.startswith(".")]


def messages(sources: Iterable[Source]) -> Iterator[tuple[str, bytes]]:
    """(where, raw bytes) of every message; an mbox's ``From `` line is not part of its message."""
    for source in sources:
        if source.kind == "file":
            with open(source.path, "rb") as stream:
                yield source.path, stream.read()
        elif source.kind == "maildir":
            for sub in ("cur", "new"):
                directory = os.path.join(source.path, sub)
                for name in sorted(_listing(directory)):
                    with open(os.path.join(directory, name), "rb") as stream:
                        yield os.path.join(directory, name), stream.read()
        else:
            box = mailbox.mbox(source.path, create=False)
            try:
                for number, key in enumerate(box.iterkeys(), 1):
                    yield f"{source.path}#{number}", box.get_bytes(key)
            finally:
                box.close()
