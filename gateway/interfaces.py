"""The seams between the rooms of the gateway.

Each is a zope.interface; implementations say what they are (`DirectorySpool`,
`SmtpTransport`), fakes are `Memory...` and pass the same contract tests.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from gateway.model import Delivery, Envelope, Quarantine, QueuedMessage, RecipientResult, Session


class IIncomingMessage(Interface):
    """A message being received, before it is committed to the spool.

    The front door writes the bytes as they arrive (the Received header first);
    memory stays bounded because the spool spills to disk as it goes.
    """

    queue_id = Attribute("str: the queue id this message will have once committed")
    size = Attribute("int: bytes written so far")

    def write(data: bytes) -> None:
        """Append message bytes (CRLF line ends, dot-unstuffed)."""

    def add_headers(data: bytes) -> None:
        """Header lines (CRLF-ended) to insert after the first write, at commit.

        The first write is our Received header (and the filters' headers known
        then); end-of-data filters add theirs here, once the body is in.
        """

    def prefix_subject(prefix: str) -> None:
        """At commit, put `prefix` in front of the Subject (a spam tag), once; add one if none."""

    def open() -> IO[bytes]:
        """The bytes written so far, from the first (for the end-of-data filters); close it."""

    def commit(
        envelope: Envelope, session: Session, hold: bool = False, quarantine: Quarantine | None = None
    ) -> Deferred[str]:
        """Make the message durable: message and envelope fsync'ed, directory entries too.

        With `hold` (keyword), it goes to the hold state instead of the queue: a
        filter held it, and only an operator's release sends it on. With a
        `quarantine` record it is held too, and the record (why, which filters)
        is kept with it for the quarantine commands.

        Returns a Deferred firing with the queue id only once everything is on disk.
        It fails (never silently) if the disk is full or the write fails; the
        caller then answers 4xx and nothing was acknowledged.
        """

    def abort() -> None:
        """Forget the message (client gave up, size exceeded, rejected)."""


class ISpool(Interface):
    """The durable queue. `new_message().commit()` is the only way in."""

    def new_message() -> IIncomingMessage:
        """Start receiving a message; returns an IIncomingMessage."""

    def recover() -> Deferred[int]:
        """On start: clean half-written files, requeue active messages.

        Returns a Deferred firing with the number of messages requeued.
        """

    def list(state: str) -> list[str]:
        """Queue ids in a state ("incoming", "active", "deferred", "hold", "corrupt")."""

    def states() -> dict[str, str]:
        """Every queue id in the spool and its state (one walk, for scans and listings)."""

    def load(queue_id: str) -> QueuedMessage:
        """The QueuedMessage for an id (KeyError if unknown)."""

    def update(message: QueuedMessage) -> Deferred[None]:
        """Durably record a QueuedMessage's new recipient states / schedule / state.

        Moves it to `message.state` if that changed. Returns a Deferred.
        """

    def remove(queue_id: str) -> Deferred[None]:
        """Delete a message (all delivered or bounced, or operator delete). Deferred."""

    def message_path(queue_id: str) -> str:
        """The path of the stored message file (read-only for transports).

        Open it with `gateway.queue.open_message`, which reads past the
        spool's header in front of the message.
        """


class ITransport(Interface):
    """A way out of the queue (smtp, mx, relay, lmtp, maildir)."""

    name = Attribute("str: the transport spec it was built from, for logs")

    def deliver(delivery: Delivery) -> Deferred[list[RecipientResult]]:
        """Deliver one message to some recipients.

        `delivery` is a `gateway.delivery.model.Delivery`. Returns a Deferred
        firing with a list of `RecipientResult`, one per recipient, in order.
        The Deferred never fails for a remote refusal: each recipient's reply
        says positive / transient / permanent. It fails only on a bug.
        """


class IResolver(Interface):
    """DNS for delivery: Deferred-returning lookups."""

    def lookup_mx(domain: str) -> Deferred[list[tuple[int, str]]]:
        """[(preference, host)] sorted; [] if the domain has no MX (implicit MX).

        Fails with `NullMX` for RFC 7505 null MX, `NoSuchDomain` for NXDOMAIN,
        `DnsTemporaryError` for SERVFAIL/timeouts.
        """

    def lookup_addresses(host: str) -> Deferred[list[str]]:
        """[ip, ...] from AAAA and A records; same errors."""


class IReception(Interface):
    """What the SMTP server asks before and after DATA (relay control, filters, spool)."""

    def open_session(session: Session, counts: Any) -> Any:
        """The checks for one connection (`gateway.reception.SessionChecks`).

        `counts` is a callable returning the session's numbers so far.
        """


class IFilter(Interface):
    """One link of a filter chain: a name, the stages it acts on, one check.

    Built by the class method ``from_config(options, services)``, where
    `options` is the filter's ``[filters.<name>]`` table (a
    `gateway.config.Section`: take its keys, then call ``done()``) and `services`
    is a `gateway.filters.FilterServices`. Filters never mutate their inputs.
    The chain runner owns timeouts and failures: a check that raises or takes
    too long yields the configured failure verdict.
    """

    name = Attribute("str: the name in the config and the logs")
    stages = Attribute("frozenset[gateway.model.Stage]: the stages check() is called at")

    def check(request: Any) -> Any:
        """A `gateway.filters.Request` -> Verdict, or a Deferred firing with one."""


class ISessionObserver(Interface):
    """Optional for a filter: told when a session whose connect stage it saw ends."""

    def session_closed(session: Session, counts: dict[str, int]) -> None:
        """The connection is gone (count it down, forget it).

        Called for sessions whose connect stage ran this filter's chain; one that
        stopped earlier (a REJECT before this filter) may be told too, so a filter
        only counts down what it counted up.

        `counts` holds the session's totals: "commands", "errors", "messages",
        "recipients", "unknown_recipients", "rset".
        """


class IPrepare(Interface):
    """Optional for a filter: starts its slow work early, while the stage waits for another.

    Postscreen asks the DNSBLs while it waits to see whether the client talks
    before the banner; a chain runs its filters one after another. So when a
    filter makes a stage wait (the protocol filter's greet wait, another DNS
    lookup), the runner calls ``prepare`` on the filters after it in that
    stage; their ``check`` later asks again and finds the answers cached or
    under way.
    """

    def prepare(request: Any) -> None:
        """Start what ``check(request)`` will need (DNS lookups); never decides, never fails."""


class IReloadable(Interface):
    """Optional for a filter: re-reads its files on SIGHUP / `mailgatectl reload`."""

    def reload() -> None:
        """Re-read; on a bad file raise ConfigError and keep the old data."""


class IAuthGuard(Interface):
    """Optional for a filter: guards SMTP AUTH (failure delay and lockout per client)."""

    def auth_allowed(session: Session) -> Any:
        """Verdict (or Deferred of one): CONTINUE lets AUTH go on; REJECT/DEFER refuse it."""

    def auth_result(session: Session, user: str, success: bool) -> float:
        """Note an AUTH outcome; returns seconds to wait before answering it."""


class IAcceptObserver(Interface):
    """Optional for a filter: told about every message once it is queued."""

    def message_accepted(request: Any, hits: Any, held: bool) -> None:
        """`request` is the DATA-stage Request, `hits` every Hit of the transaction.

        An observer may also have ``message_refused(request, hits)``: called when a
        message of its chain was refused or discarded at the end of data.
        """


class IOutbox(Interface):
    """How the gateway sends mail of its own (notices, auto-replies, reports) through the queue.

    What is sent is queued like any other message (the one way into the spool)
    without running the filter chains; the Deferred fires with its queue id
    once it is durable, or fails.
    """

    postmaster = Attribute("str: the address notices to the administrator go to")

    def send(mail_from: str, rcpt_to: tuple[str, ...], message: bytes) -> Deferred[str]:
        """Queue `message` (a whole RFC 5322 message, CRLF line ends) from `mail_from`
        ("" for the null sender, as notices and auto-replies should use) to `rcpt_to`."""
