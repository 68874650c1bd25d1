"""``mailgatectl bayes``: train the classifier, show what it knows, forget messages.

    mailgatectl bayes train --spam|--ham PATH...   (mbox, Maildir, .eml files, directories)
    mailgatectl bayes forget PATH...
    mailgatectl bayes stats

These open the token store (``<state_dir>/bayes.sqlite``) directly, as
``sa-learn`` does: training runs in this process, in batches of one
transaction each, while a running gateway goes on reading the same file (WAL).
A message learned before as the same class is counted once; learned before as
the other class, it is moved over. The gateway's filter reads the new counts at
its next message.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from gateway.bayes.mailboxes import MailboxError, count, find_sources, messages
from gateway.bayes.sqlite import TokenDatabase
from gateway.bayes.store import Learned, bayes_path
from gateway.bayes.tokenizer import DEFAULT_SUBJECT_PREFIX
from gateway.bayes.training import Sample, sample
from gateway.state import StoreError

__all__ = ["Progress", "add_commands", "run", "subject_prefix"]

BATCH = 200  # messages per transaction: the gateway's writers wait at most one batch


def add_commands(commands: Any) -> None:
    """Register ``bayes`` and its actions on mailgatectl's sub-command parsers."""
    bayes = commands.add_parser("bayes", help="train the Bayes classifier and show what it knows")
    actions = bayes.add_subparsers(dest="bayes_action", required=True)
    train = actions.add_parser("train", help="learn messages as spam or as ham")
    kind = train.add_mutually_exclusive_group(required=True)
    kind.add_argument("--spam", action="store_true", help="the messages are spam")
    kind.add_argument("--ham", action="store_true", help="the messages are ham (wanted mail)")
    train.add_argument(
        "paths", nargs="+", metavar="PATH", help="mbox files, Maildirs, message files, directories"
    )
    forget = actions.add_parser("forget", help="take learned messages out of the classifier again")
    forget.add_argument("paths", nargs="+", metavar="PATH")
    actions.add_parser("stats", help="how much the classifier has learned")


def run(args: argparse.Namespace, cfg: Any, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run a ``bayes`` action; the exit status (1 with one line on stderr when it cannot)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    path = bayes_path(cfg)
    try:
        database = TokenDatabase(path)
        try:
            if args.bayes_action == "stats":
                _stats(database, path, out)
            elif args.bayes_action == "train":
                _train(database, args.paths, subject_prefix(cfg), args.spam, out, err)
            else:
                _forget(database, args.paths, subject_prefix(cfg), out, err)
        finally:
            database.close()
    except (MailboxError, StoreError) as error:
        print(f"mailgatectl: {error}", file=err)
        return 1
    except KeyboardInterrupt:
        print("mailgatectl: interrupted (the batches committed so far are kept)", file=err)
        return 1
    return 0


def _stats(database: TokenDatabase, path: str, out: IO[str]) -> None:
    stats = database.stats()
    last = (
        datetime.datetime.fromtimestamp(stats.last_learned).strftime("%Y-%m-%d %H:%M:%S")
        if stats.last_learned
        else "never"
    )
    print(f"token store:   {path}", file=out)
    print(f"spam learned:  {stats.nspam}", file=out)
    print(f"ham learned:   {stats.nham}", file=out)
    print(f"tokens:        {stats.tokens}", file=out)
    print(f"messages seen: {stats.messages}", file=out)
    print(f"last learned:  {last}", file=out)


def subject_prefix(cfg: Any) -> str:
    """The subject tag the "bayes" filter adds (taken off before learning), from the config."""
    options = cfg.filters.options.get("bayes", {})
    prefix = options.get("subject_prefix", DEFAULT_SUBJECT_PREFIX)
    return prefix if isinstance(prefix, str) else DEFAULT_SUBJECT_PREFIX


def _samples(
    paths: list[str], prefix: str, err: IO[str], tally: dict[str, int]
) -> Iterator[tuple[str, Sample]]:
    """(where, Sample) of each readable message, with a progress bar; unreadable ones are counted."""
    from gateway.content.parse import parse_message

    sources = find_sources(paths)
    progress = Progress(count(sources), err)
    for where, raw in messages(sources):
        try:
            learned = sample(parse_message(raw), prefix)
        except Exception as error:  # one broken message must not stop a training of thousands
            tally["unreadable"] += 1
            progress.note(f"{where}: cannot read it ({error.__class__.__name__}: {error}); skipped")
        else:
            yield where, learned
        progress.step()
    progress.finish()


def _train(
    database: TokenDatabase, paths: list[str], prefix: str, spam: bool, out: IO[str], err: IO[str]
) -> None:
    tally = {"unreadable": 0, **{learned.value: 0 for learned in Learned}}
    batch: list[tuple[str, frozenset[str], bool]] = []

    def flush() -> None:
        for result in database.learn_many(batch):
            tally[result.value] += 1
        batch.clear()

    for _where, learned in _samples(paths, prefix, err, tally):
        batch.append((learned.digest, learned.tokens, spam))
        if len(batch) >= BATCH:
            flush()
    flush()
    kind = "spam" if spam else "ham"
    other = "ham" if spam else "spam"
    print(
        f"learned {tally['learned']} new {kind}; {tally['relearned']} moved from {other} to {kind};"
        f" {tally['already']} already learned as {kind}; {tally['unreadable']} unreadable",
        file=out,
    )


def _forget(database: TokenDatabase, paths: list[str], prefix: str, out: IO[str], err: IO[str]) -> None:
    tally = {"unreadable": 0, "forgotten": 0, "unknown": 0}
    learned: Sample
    for _where, learned in _samples(paths, prefix, err, tally):
        tally["forgotten" if database.forget(learned.digest, learned.tokens) else "unknown"] += 1
    print(
        f"forgot {tally['forgotten']} messages; {tally['unknown']} were not learned;"
        f" {tally['unreadable']} unreadable",
        file=out,
    )


class Progress:
    """A progress bar on a terminal; a line every few seconds otherwise (a log, a pipe)."""

    WIDTH = 30

    def __init__(
        self, total: int, stream: IO[str], *, clock: Any = time.monotonic, every: float = 5.0
    ) -> None:
        self.total = total
        self.stream = stream
        self.clock = clock
        self.every = every
        self.done = 0
        self.started = clock()
        self.shown = self.started
        self.tty = stream.isatty()

    def step(self) -> None:
        self.done += 1
        now = self.clock()
        if self.tty and (now - self.shown >= 0.1 or self.done == self.total):
            self.shown = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif not self.tty and now - self.shown >= self.every:
            self.shown = now
            self.stream.write(self.line(now) + "\n")

    def note(self, text: str) -> None:
        """A message for the operator, on a line of its own above the bar."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")

    def finish(self) -> None:
        now = self.clock()
        self.stream.write(("\r" if self.tty else "") + self.line(now) + "\n")
        self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            filled = min(self.WIDTH, self.done * self.WIDTH // self.total)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            percent = 100 * self.done // self.total
            return f"[{bar}] {self.done}/{self.total} {percent:3d}% {rate:.0f} msg/s"
        return f"{self.done} messages {rate:.0f} msg/s"
