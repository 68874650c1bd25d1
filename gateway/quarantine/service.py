"""The quarantine's timers: expiry every hour, and the daily notice to the postmaster."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.interfaces import IOutbox
from gateway.quarantine import QuarantineRoom, Selection
from gateway.quarantine.outbox import compose

log = Logger(namespace="mailgate.quarantine")

EXPIRY_INTERVAL = 3600.0
DAY = 86400.0
NOTICE_LINES = 500  # messages listed in one notice; the rest are counted


def notice_text(room: QuarantineRoom, since: float, until: float) -> tuple[str, str] | None:
    """(subject, text) of the notice for what was quarantined in [since, until); None if nothing was."""
    found = room.messages(Selection(since=since, until=until))
    if not found:
        return None
    lines = [
        f"{len(found)} message(s) were quarantined in the last day. To deliver one (a false",
        "positive), or to delete it, on the gateway:",
        "",
        "    mailgatectl quarantine show ID",
        "    mailgatectl quarantine release ID      (or train-ham ID: release and teach Bayes)",
        "    mailgatectl quarantine delete ID       (or train-spam ID: delete and teach Bayes)",
        "",
    ]
    for message in found[:NOTICE_LINES]:
        row = room.row(message)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(message.arrived))
        lines.append(f"{message.queue_id}  {when}  {row['kind']}  score {row['score']:g}")
        lines.append(f"    from <{row['sender']}> to {', '.join(f'<{r}>' for r in row['recipients'])}")
        if row.get("subject"):
            lines.append(f"    subject: {row['subject']}")
        lines.append(f"    reason: {row['reason']}")
    if len(found) > NOTICE_LINES:
        lines.append(f"... and {len(found) - NOTICE_LINES} more (mailgatectl quarantine list)")
    return f"Quarantine: {len(found)} message(s) held in the last day", "\n".join(lines) + "\n"


def seconds_until(notice_time: str, now: float) -> float:
    """Seconds from `now` to the next local `notice_time` ("HH:MM")."""
    hour, minute = (int(part) for part in notice_time.split(":"))
    current = datetime.datetime.fromtimestamp(now)
    target = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= current:
        target += datetime.timedelta(days=1)
    return (target - current).total_seconds()


class QuarantineService(Service):
    """Runs the expiry every hour and sends the daily notice (see the module docstring)."""

    def __init__(
        self,
        room: QuarantineRoom,
        outbox: IOutbox,
        hostname: str,
        *,
        notice_time: str = "08:00",
        notice_to: str = "",
        clock: Any = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.room = room
        self.outbox = outbox
        self.hostname = hostname
        self.notice_time = notice_time
        self.notice_to = notice_to or outbox.postmaster
        self.clock = clock
        self.now = now
        self._expiry: LoopingCall | None = None
        self._notice: Any = None

    def startService(self) -> None:
        super().startService()
        self._expiry = LoopingCall(self.expire)
        self._expiry.clock = self.clock
        self._expiry.start(EXPIRY_INTERVAL, now=True).addErrback(self._stopped_by_error)
        self._schedule_notice()

    def stopService(self) -> None:
        super().stopService()
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        if self._notice is not None and self._notice.active():
            self._notice.cancel()

    def _stopped_by_error(self, failure: Failure) -> None:
        log.failure("quarantine: the expiry timer stopped", failure)

    def expire(self) -> Deferred[int]:
        def failed(failure: Failure) -> int:
            log.error("quarantine: expiry failed: {error}", error=failure.getErrorMessage())
            return 0

        return self.room.expire(self.now()).addErrback(failed)

    def _schedule_notice(self) -> None:
        if self.notice_time:
            self._notice = self.clock.callLater(seconds_until(self.notice_time, self.now()), self._notice_due)

    def _notice_due(self) -> None:
        self.send_notice().addBoth(lambda _: self._schedule_notice())

    def send_notice(self) -> Deferred[str | None]:
        """The notice for the last day, to the postmaster (nothing when nothing was held)."""
        now = self.now()
        composed = notice_text(self.room, now - DAY, now)
        if composed is None:
            return succeed(None)
        subject, text = composed
        message = compose(self.hostname, f"postmaster@{self.hostname}", (self.notice_to,), subject, text)
        sent: Deferred[str] = self.outbox.send("", (self.notice_to,), message)

        def failed(failure: Failure) -> None:
            log.error("quarantine: cannot queue the daily notice: {error}", error=failure.getErrorMessage())

        return sent.addErrback(failed)
