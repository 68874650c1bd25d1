"""The maildir transport: local delivery into a Maildir (the embedded default).

``maildir:/var/mail/{domain}/{local}/`` -- the template is filled in per
recipient (``{local}``, ``{domain}``, ``{address}``, lower-cased and made safe
for a path). Each message is written to ``tmp/``, fsync'ed, renamed into
``new/`` and the directory fsync'ed, in a thread: the reactor never waits on
the disk. A ``Return-Path`` and a ``Delivered-To`` header are added on top.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gateway.interfaces import ITransport
from gateway.model import Delivery, Recipient, RecipientResult
from gateway.queue import open_message

_UNSAFE = re.compile(r"[^\w.+=-]")  # \w: letters of any script, digits, _


def safe_part(text: str) -> str:
    """A piece of an address made safe as one path component ("../x" cannot escape)."""
    cleaned = _UNSAFE.sub("_", text.lower()).lstrip(".")
    return cleaned or "_"


def maildir_for(template: str, address: str) -> str:
    local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
    return template.format(local=safe_part(local), domain=safe_part(domain), address=safe_part(address))


class _Names:
    """Unique Maildir file names: time, pid, a counter and the host."""

    def __init__(self) -> None:
        self.counter = 0
        self.host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def next(self) -> str:
        self.counter += 1
        now = time.time()
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{self.counter}.{self.host}"


def _write_into(directory: str, name: str, parts: list[bytes]) -> str:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
    temp = os.path.join(directory, "tmp", name)
    final = os.path.join(directory, "new", name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.rename(temp, final)
    dir_fd = os.open(os.path.join(directory, "new"), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


@implementer(ITransport)
class MaildirTransport:
    """Delivers each recipient's copy into the Maildir its template names."""

    def __init__(self, template: str, *, reactor: object, threadpool: ThreadPool) -> None:
        self.name = f"maildir:{template}"
        self.template = template
        self.reactor = reactor
        self.threadpool = threadpool
        self._names = _Names()

    def deliver(self, delivery: Delivery) -> Deferred[list[RecipientResult]]:
        work: Callable[[], list[RecipientResult]] = lambda: self._deliver(delivery)  # noqa: E731
        return deferToThreadPool(self.reactor, self.threadpool, work)  # type: ignore[arg-type]

    def _deliver(self, delivery: Delivery) -> list[RecipientResult]:
        try:
            with open_message(delivery.message_path) as handle:
                content = handle.read()
        except OSError as error:
            return [
                self._failed(r, 451, "4.3.0", f"cannot read the queued message: {error.strerror}")
                for r in delivery.recipients
            ]
        results = []
        return_path = f"Return-Path: <{delivery.envelope.mail_from}>\r\n".encode()
        for recipient in delivery.recipients:
            directory = maildir_for(self.template, recipient.address)
            header = return_path + f"Delivered-To: {recipient.address}\r\n".encode()
            try:
                final = _write_into(directory, self._names.next(), [header, content])
            except OSError as error:
                # a full disk or a permission problem is ours to fix: keep the mail and retry
                results.append(
                    self._failed(recipient, 451, "4.3.0", f"cannot write to {directory}: {error.strerror}")
                )
                continue
            results.append(
                RecipientResult(
                    recipient,
                    250,
                    "2.0.0",
                    f"delivered to maildir ({os.path.basename(final)})",
                    f"maildir:{directory}",
                )
            )
        return results

    def _failed(self, recipient: Recipient, code: int, enhanced: str, text: str) -> RecipientResult:
        return RecipientResult(recipient, code, enhanced, text, "none")
