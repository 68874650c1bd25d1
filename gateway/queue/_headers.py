"""Edits to a message's header section as it is written to the spool (the Subject tag).

The bytes stream through: only the header section (up to the empty line, at
most `HEAD_LIMIT` bytes) is held and edited, so a 100 MB message costs no more
memory than a small one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

HEAD_LIMIT = 1 << 20  # a header section longer than this is left as it is

_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*")
_END = b"\r\n\r\n"


def prefix_subject(prefix: str) -> Callable[[bytes], bytes]:
    """An edit putting `prefix` in front of the Subject (once), or adding a Subject if there is none."""
    tag = prefix.encode("utf-8")

    def edit(head: bytes) -> bytes:
        found = _SUBJECT.search(head)
        if found is None:
            end = len(head) - 2 if head.endswith(b"\r\n\r\n") else len(head)
            return head[:end] + b"Subject: " + tag.rstrip() + b"\r\n" + head[end:]
        if head[found.end() :].startswith(tag.strip()):
            return head  # tagged already (by us, or by a scanner before us)
        return head[: found.end()] + tag + head[found.end() :]

    return edit


def rewrite_head(pieces: Iterable[bytes], edit: Callable[[bytes], bytes]) -> Iterator[bytes]:
    """The pieces of a message with `edit` applied to its header section."""
    source = iter(pieces)
    held = bytearray()
    for piece in source:
        held += piece
        end = held.find(_END)
        if end >= 0:
            yield edit(bytes(held[: end + 4]))
            yield bytes(held[end + 4 :])
            break
        if len(held) > HEAD_LIMIT:
            yield bytes(held)  # no header section we could find: untouched
            break
    else:
        yield edit(bytes(held)) if held else b""
        return
    yield from source
