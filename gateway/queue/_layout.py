"""Where each file of the spool lives (see docs/queue-format.rst)."""

from __future__ import annotations

import os

from gateway.queue._ids import MAX_HASH_LEVELS, hash_dirs

STATES = ("incoming", "active", "deferred", "hold", "corrupt")
MESSAGES = "message"  # the message bytes, whatever the state: a stable path
TEMP = "tmp"  # files being written; everything here is garbage after a crash
LOCK = "lock"
ENVELOPE_SUFFIX = ".json"
MESSAGE_SUFFIX = ".eml"


class Layout:
    """The paths of a spool directory with `hash_levels` levels of hashed subdirectories."""

    def __init__(self, root: str, hash_levels: int) -> None:
        if not 0 <= hash_levels <= MAX_HASH_LEVELS:
            raise ValueError(f"hash_levels must be between 0 and {MAX_HASH_LEVELS}, not {hash_levels}")
        self.root = os.path.abspath(root)
        self.hash_levels = hash_levels
        self.temp = os.path.join(self.root, TEMP)
        self.lock = os.path.join(self.root, LOCK)

    def top(self, name: str) -> str:
        return os.path.join(self.root, name)

    def envelope_dir(self, state: str, queue_id: str) -> str:
        return os.path.join(self.root, state, *hash_dirs(queue_id, self.hash_levels))

    def envelope(self, state: str, queue_id: str) -> str:
        return os.path.join(self.envelope_dir(state, queue_id), queue_id + ENVELOPE_SUFFIX)

    def message_dir(self, queue_id: str) -> str:
        return os.path.join(self.root, MESSAGES, *hash_dirs(queue_id, self.hash_levels))

    def message(self, queue_id: str) -> str:
        return os.path.join(self.message_dir(queue_id), queue_id + MESSAGE_SUFFIX)

    def corrupt_message(self, queue_id: str) -> str:
        return os.path.join(self.envelope_dir("corrupt", queue_id), queue_id + MESSAGE_SUFFIX)

    def temp_message(self, queue_id: str) -> str:
        return os.path.join(self.temp, queue_id + MESSAGE_SUFFIX)

    def temp_envelope(self, queue_id: str, version: int) -> str:
        return os.path.join(self.temp, f"{queue_id}.{version}{ENVELOPE_SUFFIX}")

    def files(self, top: str) -> list[tuple[str, str]]:
        """(directory, name) of every file under a top directory, at the hashed depth."""
        found: list[tuple[str, str]] = []
        self._walk(os.path.join(self.root, top), self.hash_levels, found)
        return found

    def _walk(self, directory: str, depth: int, found: list[tuple[str, str]]) -> None:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if depth == 0:
                if entry.is_file(follow_symlinks=False):
                    found.append((directory, entry.name))
            elif entry.is_dir(follow_symlinks=False):
                self._walk(entry.path, depth - 1, found)
