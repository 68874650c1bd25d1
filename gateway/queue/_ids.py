"""Queue ids: unique, time-sorted, short, filesystem-safe; and where they hash to.

A queue id is 17 characters::

    0PBQ7M4Z1XK3C  7A   0E4F
    |-- time ---|  |r|  |slot|

- 11 characters of Crockford base32 (``0-9A-Z`` without ``I L O U``, an
  alphabet in ASCII order) of the POSIX time in microseconds, strictly
  increasing within the process, so ids sort by arrival time;
- 2 random base32 characters (10 bits), so that a restart after the clock
  stepped back cannot reuse an id; when several processes share a spool (the
  SMTP worker processes), the first of them is the process's tag instead;
- 4 upper-case hex characters: the *slot*, ``(microseconds >> 20) & 0xFFFF``,
  a counter that advances about once a second. The hashed subdirectories are
  taken from this tail (last character first), so the messages committed in
  the same second share their directories and one directory fsync serves the
  whole batch, while a queue that builds up over minutes spreads evenly over
  all of them.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_HASH_LEVELS = 4  # the hex tail has four characters
QUEUE_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{13}[0-9A-F]{4}\Z")


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class QueueIds:
    """Makes queue ids; safe to call from any thread."""

    def __init__(self, tag: int | None = None) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._random = random.Random(os.urandom(16))
        if tag is not None and not 0 <= tag < 32:
            raise ValueError(f"a queue id tag is 0-31, not {tag}")
        self._tag = tag

    def next(self) -> str:
        with self._lock:
            micros = max(time.time_ns() // 1000, self._last + 1)
            self._last = micros
            noise = self._random.getrandbits(10)
        if self._tag is not None:
            # several processes share one spool: each has its own tag in the first
            # random character, and its own strictly increasing clock, so no two
            # processes can ever make the same id
            noise = (self._tag << 5) | (noise & 31)
        slot = (micros >> 20) & 0xFFFF
        return f"{_base32(micros, 11)}{ALPHABET[noise >> 5]}{ALPHABET[noise & 31]}{slot:04X}"


def is_queue_id(text: str) -> bool:
    """True for a well-formed queue id (anything else must never become a path)."""
    return QUEUE_ID.match(text) is not None


def hash_dirs(queue_id: str, levels: int) -> tuple[str, ...]:
    """The hashed subdirectory names for an id: one hex character per level, from the tail."""
    return tuple(queue_id[-1 - level] for level in range(levels))
