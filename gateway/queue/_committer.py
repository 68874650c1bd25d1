"""The group-commit writer: spool file operations in writer threads, fsyncs shared.

The reactor thread only appends an operation to a list and signals a condition
variable (a few microseconds). Writer threads take the pending operations in
batches and run each batch in two phases:

1. ``prepare()`` of every operation: write and fsync the data files, rename
   them into place; then one fsync per distinct directory the batch touched;
2. ``publish()`` of every operation: rename the envelope files into their state
   directories; then again one fsync per distinct directory.

Only then is the whole batch's outcome handed back to the reactor with a single
``reactor.callFromThread``. An operation that fails (in either phase, or
because a directory it needs could not be synced) is undone - its partial files
removed - and its Deferred fails with a SpoolError; the others in the batch are
unaffected.

While a writer thread is busy, new operations accumulate behind it, and the
next free thread takes all of them, so that the busier the spool, the more
commits share each directory fsync. A second thread is put to work only when
`SPREAD` operations are waiting (the disk is the bottleneck, and fsyncs in
parallel help): every thread woken for an operation or two would make a batch
of its own, with a directory fsync of its own, and cost more CPU than it
saves in waiting (measured in docs/benchmarks.rst).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="mailgate.spool")

_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
SPREAD = 8  # operations waiting behind a busy writer thread before another one starts on them


def _caught() -> Failure:
    """The exception being handled, as a Failure."""
    return Failure()  # type: ignore[no-untyped-call]


class SpoolError(Exception):
    """A spool file operation failed: names the path and the system's reason."""

    def __init__(self, message: str, path: str = "", error: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = error

    @classmethod
    def from_os(cls, action: str, path: str, error: OSError) -> SpoolError:
        reason = os.strerror(error.errno) if error.errno else str(error)
        return cls(f"spool: cannot {action} {path}: {reason}", path, error.errno)


class Disk:
    """The file-system primitives of the spool, each failing with a SpoolError."""

    def __init__(self, *, fsync: bool) -> None:
        self.fsync = fsync
        self._known_dirs: set[str] = set()

    def write_file(self, path: str, chunks: Iterable[bytes], head: Callable[[], bytes] | None = None) -> None:
        """Create `path` (it must not exist), write the chunks, fsync, close.

        `head`: called once the chunks are written, for bytes that overwrite
        the start of the file (a header only known at the end).
        """
        try:
            fd = os.open(path, _O_NEW, 0o600)
        except OSError as error:
            raise SpoolError.from_os("create", path, error) from None
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if head is not None:
                self.write_at_start(fd, head())
            if self.fsync:
                os.fsync(fd)
        except OSError as error:
            os.close(fd)
            self.unlink(path)
            raise SpoolError.from_os("write", path, error) from None
        os.close(fd)

    @staticmethod
    def write_at_start(fd: int, data: bytes) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)

    def sync_file(self, fd: int, path: str) -> None:
        if self.fsync:
            try:
                os.fsync(fd)
            except OSError as error:
                raise SpoolError.from_os("fsync", path, error) from None

    def rename(self, source: str, target: str) -> None:
        try:
            os.rename(source, target)
        except OSError as error:
            raise SpoolError.from_os(f"rename {source} to", target, error) from None

    def unlink(self, path: str) -> bool:
        """Remove a file if it is there; True if it was. Never raises."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as error:
            log.error(
                "spool: cannot remove {path}: {reason}", path=path, reason=os.strerror(error.errno or 0)
            )
            return False
        return True

    def sync_dir(self, path: str) -> None:
        if not self.fsync:
            return
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise SpoolError.from_os("fsync directory", path, error) from None

    def ensure_dir(self, path: str) -> None:
        """Make `path` and missing parents (mode 0700), each new entry made durable."""
        if path in self._known_dirs:
            return
        missing = []
        walk = path
        while not os.path.isdir(walk):
            missing.append(walk)
            walk = os.path.dirname(walk)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            except OSError as error:
                raise SpoolError.from_os("create directory", directory, error) from None
            self.sync_dir(os.path.dirname(directory))
        self._known_dirs.add(path)


class Operation(Protocol):
    """One spool change, run by a writer thread in two phases."""

    def prepare(self, disk: Disk) -> Iterable[str]:
        """Phase 1; returns the directories to fsync before phase 2."""

    def publish(self, disk: Disk) -> Iterable[str]:
        """Phase 2; returns the directories to fsync before success is reported."""

    def finish(self, disk: Disk) -> Any:
        """After both phases are durable: tidy up; returns the Deferred's result."""

    def undo(self, disk: Disk) -> None:
        """The operation failed: remove whatever it left behind."""


_Job = tuple[Operation, "Deferred[Any]"]


class GroupCommitter:
    """Runs Operations in up to `threads` writer threads, sharing directory fsyncs."""

    def __init__(
        self, reactor: IReactorFromThreads, disk: Disk, *, threads: int, name: str = "spool"
    ) -> None:
        if threads < 1:
            raise ValueError("the spool needs at least one writer thread")
        self._reactor = reactor
        self._disk = disk
        self._max_threads = threads
        self._name = name
        self._condition = threading.Condition(threading.Lock())
        self._pending: list[_Job] = []
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._stopping = False
        self._outstanding = 0  # reactor thread only
        self._drained: list[Deferred[None]] = []
        self.batches = 0  # statistics, written by writer threads
        self.operations = 0
        self.dir_syncs = 0

    def submit(self, operation: Operation) -> Deferred[Any]:
        """Run `operation`; the Deferred fires in the reactor thread once it is durable."""
        if self._stopping:
            return fail(SpoolError("spool: the writer is stopped"))
        result: Deferred[Any] = Deferred()
        self._outstanding += 1
        with self._condition:
            self._pending.append((operation, result))
            busy = len(self._threads) - self._idle
            if busy and len(self._pending) < SPREAD:
                pass  # the busy thread takes it with the others when it is done
            elif self._idle:
                self._condition.notify()
            elif len(self._threads) < self._max_threads:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-writer-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return result

    def stop(self) -> Deferred[None]:
        """Finish what was submitted, then let the threads end. Fires when all is reported."""
        self._stopping = True
        with self._condition:
            self._condition.notify_all()
        done: Deferred[None] = Deferred()
        if self._outstanding == 0:
            done.callback(None)
        else:
            self._drained.append(done)
        return done

    # --- writer threads ---------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._pending:
                    if self._stopping:
                        return
                    self._idle += 1
                    self._condition.wait()
                    self._idle -= 1
                # everything, or with enough waiting for several threads a fair share
                share = len(self._pending)
                if share >= 2 * SPREAD and self._idle:
                    share = -(-share // (self._idle + 1))
                batch = self._pending[:share]
                del self._pending[:share]
                if len(self._pending) >= SPREAD and self._idle:
                    self._condition.notify()
            self._reactor.callFromThread(self._deliver, self._run(batch))

    def _run(self, batch: list[_Job]) -> list[tuple[Deferred[Any], bool, Any]]:
        outcomes: list[tuple[Deferred[Any], bool, Any]] = []
        live = list(batch)
        for phase in ("prepare", "publish"):
            needs: list[tuple[_Job, Iterable[str]]] = []
            for job in live:
                try:
                    needs.append((job, getattr(job[0], phase)(self._disk)))
                except Exception:
                    outcomes.append(self._undo(job, _caught()))
            broken = self._sync_dirs({d for _, dirs in needs for d in dirs})
            live = []
            for job, dirs in needs:
                failure = next((broken[d] for d in dirs if d in broken), None)
                if failure is None:
                    live.append(job)
                else:
                    outcomes.append(self._undo(job, failure))
        for operation, deferred in live:
            try:
                outcomes.append((deferred, True, operation.finish(self._disk)))
            except Exception:
                outcomes.append((deferred, False, _caught()))
        self.batches += 1
        self.operations += len(batch)
        return outcomes

    def _sync_dirs(self, directories: set[str]) -> dict[str, Failure]:
        broken: dict[str, Failure] = {}
        for directory in sorted(directories):
            try:
                self._disk.sync_dir(directory)
            except Exception:
                broken[directory] = _caught()
        self.dir_syncs += len(directories)
        return broken

    def _undo(self, job: _Job, failure: Failure) -> tuple[Deferred[Any], bool, Any]:
        operation, deferred = job
        try:
            operation.undo(self._disk)
        except Exception:
            log.failure("spool: cleaning up after a failed operation failed")
        if not isinstance(failure.value, SpoolError):
            if isinstance(failure.value, OSError):
                error = failure.value
                failure = Failure(SpoolError.from_os("write", str(error.filename or ""), error))  # type: ignore[no-untyped-call]
            else:
                log.failure("spool: operation failed", failure)
        return deferred, False, failure

    # --- reactor thread ---------------------------------------------------------

    def _deliver(self, outcomes: list[tuple[Deferred[Any], bool, Any]]) -> None:
        self._outstanding -= len(outcomes)
        for deferred, ok, value in outcomes:
            if ok:
                deferred.callback(value)
            else:
                deferred.errback(value)
        if self._outstanding == 0 and self._drained:
            drained, self._drained = self._drained, []
            for done in drained:
                done.callback(None)
