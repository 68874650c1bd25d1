"""Mail through the real reception and filter chains, on a MemoryStore, a MemorySpool and a Clock.

For the tests of the filters that keep state (auto-whitelist, greylist, quota):
the chains are built from a config text by the real registry, so the filters'
options, their checks and their message_accepted all run as in the gateway.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway.config import Config, parse
from gateway.filters import FilterServices
from gateway.filters.chain import ChainRunner, Link
from gateway.filters.registry import build_runner
from gateway.model import Direction, Envelope, Recipient, Session
from gateway.queue.memory import MemorySpool
from gateway.reception import Reception
from gateway.smtp.reply import Reply
from gateway.state.memory import MemoryStore

T = TypeVar("T")

BASE = """
[gateway]
hostname = "gw.test"
state_dir = "/nonexistent"
[relay]
domains = ["example.com"]
networks = ["10.0.0.0/8"]
"""


def fired(deferred: Deferred[T] | T) -> T:
    """The result of a Deferred that has already fired (or a plain value), or its failure raised."""
    if not isinstance(deferred, Deferred):
        return deferred
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred should have fired (everything here is in memory)"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    result: T = outcome[0]
    return result


def config(filters: str) -> Config:
    return parse(BASE + filters, "mailgate.toml", base_dir="/")


class Driver:
    """One gateway's reception: send mail through it and look at what the spool got."""

    def __init__(
        self,
        filters: str,
        *,
        appended: dict[Direction, tuple[Any, ...]] | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        """`store`: another Driver's, for two processes of one gateway (they share its clock)."""
        if store is None:
            self.clock = Clock()
            self.clock.advance(1_700_000_000)
            self.store = MemoryStore(self.clock)
        else:
            self.clock = store.clock  # type: ignore[assignment]
            self.store = store
        self.config = config(filters)
        self.services = FilterServices(self.config, self.clock, store=self.store)
        runner = build_runner(self.config, self.services)
        if appended:
            chains = dict(runner.chains)
            for direction, extra in appended.items():
                chains[direction] = chains.get(direction, ()) + tuple(Link(f) for f in extra)
            runner = ChainRunner(chains, self.clock)
        self.runner = runner
        self.spool = MemorySpool()
        self.reception = Reception(self.spool, self.config.relay, runner)

    def filter(self, name: str) -> Any:
        return next(f for f in self.runner.all_filters() if f.name == name)

    def send(
        self, session: Session, sender: str, recipients: tuple[str, ...] = ("bob@example.com",)
    ) -> tuple[Reply | None, list[Reply | None], Reply | None]:
        """One transaction: the replies to MAIL, to each RCPT, and to the end of DATA.

        DATA is sent only when MAIL and at least one RCPT were accepted (None otherwise).
        """
        checks = self.reception.open_session(session)
        envelope = Envelope(sender, ())
        mail = fired(checks.mail(session, envelope))
        if mail is not None:
            return mail, [], None
        rcpts: list[Reply | None] = []
        for address in recipients:
            reply = fired(checks.rcpt(session, envelope, Recipient(address)))
            rcpts.append(reply)
            if reply is None:
                envelope = Envelope(sender, (*envelope.rcpt_to, Recipient(address)))
        if not envelope.rcpt_to:
            return mail, rcpts, None
        message = checks.new_message(session)
        message.write(b"Subject: test\r\n\r\nhello\r\n")
        end = fired(checks.accept(session, envelope, message))
        checks.close()
        return mail, rcpts, end

    def states(self) -> list[str]:
        """The spool state of every message queued so far, in order."""
        return [self.spool.load(queue_id).state for queue_id in sorted(self.spool.messages)]
