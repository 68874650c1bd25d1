"""The mail nouns every part of the gateway shares: session, envelope, recipient.

These are frozen values. The SMTP server builds them, the spool stores them, the
router and transports read them; nothing mutates them in place.
"""

from __future__ import annotations

import enum
import functools
import ipaddress

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1024)  # several filters ask for each session's client
def peer_address(host: str) -> IPAddress | None:
    """A peer host as an IP address (IPv4-mapped IPv6 as IPv4, any %scope dropped); None if not one."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Role(enum.Enum):
    """What a listener is for, which decides what its clients may do."""

    INBOUND = "inbound"  # the Internet: may only send to relay.domains
    SUBMISSION = "submission"  # internal servers: may relay anywhere if allowed


class Body(enum.Enum):
    """The MAIL FROM BODY= parameter (RFC 6152, RFC 3030)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT = "8BITMIME"
    BINARY = "BINARYMIME"


class Ret(enum.Enum):
    """The DSN RET= parameter (RFC 3461): what a bounce returns."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(enum.Enum):
    """One value of the DSN NOTIFY= parameter (RFC 3461)."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


@attrs.frozen
class Recipient:
    """One RCPT TO, with its DSN parameters."""

    address: str
    notify: frozenset[Notify] = frozenset()  # empty: not given (means FAILURE,DELAY)
    orcpt: str | None = None  # "rfc822;user@example.com", as given (xtext decoded)


@attrs.frozen
class Envelope:
    """One mail transaction: the sender, the recipients and their parameters."""

    mail_from: str  # "" is the null sender <>
    rcpt_to: tuple[Recipient, ...]
    body: Body = Body.SEVEN_BIT
    smtputf8: bool = False
    ret: Ret | None = None
    envid: str | None = None
    size: int | None = None  # the size the client declared, if any
    auth: str | None = None  # the MAIL FROM AUTH= parameter, if any


@attrs.frozen
class Session:
    """Who is talking to the gateway: one connection, as far as it has got."""

    peer_host: str  # the client's IP address, as text
    peer_port: int = 0
    listener: str = ""  # the listener's endpoint string
    role: Role = Role.INBOUND
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_cipher: str | None = None
    authenticated_user: str | None = None
    may_relay: bool = False  # decided by relay control at connect / AUTH
    # protocol misbehaviour seen by the server, for the "protocol" filter
    pregreet: bool = False  # the client talked before our banner
    improper_pipelining: bool = False  # commands sent ahead without PIPELINING
    # set for mail the gateway fetched (POP3/IMAP): "pop3 sales@pop.example.net"; it runs
    # the "fetched" chain, and what a filter refuses cannot be refused to anyone
    fetched_from: str | None = None


class RecipientStatus(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"  # not yet delivered: first try or a later retry
    DELIVERED = "delivered"
    FAILED = "failed"  # permanently: a bounce is (or was) due


@attrs.frozen
class RecipientState:
    """A recipient of a queued message and what has happened to it so far."""

    recipient: Recipient
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    last_reply: str | None = None  # the last remote reply or our own reason, one line
    code: int | None = None  # the reply code of the last attempt (250, 451, 550...)
    dsn: str | None = None  # its enhanced status code (RFC 3463), as Postfix logs dsn=5.1.1
    relay: str | None = None  # where it went (or was tried): "mx.example.com[192.0.2.1]:25"


@attrs.frozen
class Quarantine:
    """Why a filter held a message: kept with it in the hold queue for the administrator.

    `hits` are the filters that spoke, (filter, action, reason, score), in order;
    `kind` is "quarantine" (held instead of delivered) or "rejected" (a copy of
    a message the client was refused, kept for false-positive review).
    """

    reason: str
    direction: str = "inbound"
    hits: tuple[tuple[str, str, str, float], ...] = ()
    kind: str = "quarantine"

    @property
    def score(self) -> float:
        return sum(hit[3] for hit in self.hits)


@attrs.frozen
class QueuedMessage:
    """A message in the spool: its envelope, per-recipient state and schedule."""

    queue_id: str
    envelope: Envelope
    recipients: tuple[RecipientState, ...]
    arrived: float  # POSIX time the message was accepted
    size: int  # bytes of the stored message (Received header included)
    client: str = ""  # "host[ip]" the message came from, for logs and bounces
    attempts: int = 0  # delivery rounds made so far
    next_attempt: float = 0.0  # POSIX time of the next round (deferred state)
    state: str = "incoming"  # incoming / active / deferred / hold / corrupt
    quarantine: Quarantine | None = None  # set while a filter's hold keeps it in the quarantine

    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status is RecipientStatus.PENDING)


@attrs.frozen
class Delivery:
    """One delivery attempt handed to a transport: a message to some recipients."""

    queue_id: str
    envelope: Envelope  # the whole envelope (sender, BODY, SMTPUTF8, RET, ENVID)
    recipients: tuple[Recipient, ...]  # the ones this transport should deliver now
    message_path: str  # the stored message (gateway.queue.open_message), CRLF line ends, Received on top
    size: int


@attrs.frozen
class RecipientResult:
    """What happened to one recipient in a delivery attempt."""

    recipient: Recipient
    code: int  # 2xx delivered, 4xx try again later, 5xx permanent failure
    enhanced: str | None
    text: str  # the remote reply text, or our own reason ("connect to ... timed out")
    relay: str  # where: "mx.example.com[192.0.2.1]:25", "maildir:/var/mail/x", "none"

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class Direction(enum.Enum):
    """Which filter chain a session's mail runs through."""

    INBOUND = "inbound"  # from the Internet
    OUTBOUND = "outbound"  # from internal servers and authenticated users
    FETCHED = "fetched"  # fetched from external mailboxes (POP3/IMAP)


class Stage(enum.Enum):
    """Where in a session a filter acts, in the order they happen."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the end of the message, before it is queued


class Action(enum.Enum):
    """What a filter says about a session, a transaction or one recipient.

    In Postfix's words: CONTINUE is DUNNO (no opinion), ACCEPT is OK (skip the
    rest of this stage). TAG and COPY_TO add to the message and the chain goes
    on; every other action ends the stage.
    """

    CONTINUE = "continue"
    ACCEPT = "accept"
    TAG = "tag"  # add headers (and score); the chain goes on
    QUARANTINE = "quarantine"  # keep it on hold for the administrator
    DISCARD = "discard"  # say 250, deliver nothing (logged)
    REJECT = "reject"  # 5xx
    DEFER = "defer"  # 4xx, the client tries again later
    REDIRECT = "redirect"  # deliver to `target` instead
    COPY_TO = "copy-to"  # deliver to `target` as well; the chain goes on

    @property
    def ends_stage(self) -> bool:
        return self in _ENDING


_ENDING = frozenset(Action) - {Action.CONTINUE, Action.TAG, Action.COPY_TO}


@attrs.frozen
class Verdict:
    """One filter's answer. Filters build them; the chain runner acts on them.

    `reason` is logged and, for REJECT and DEFER, sent to the client (keep it
    short, no secrets). `code` and `enhanced` override the reply's codes
    (default 554 5.7.1 for REJECT, 451 4.7.1 for DEFER; a connect-stage DEFER is
    421). `target` is the address for REDIRECT and COPY_TO. `headers` are added
    to the message (name, value), after our Received header; `subject_prefix`
    (TAG) is put in front of the Subject (``SPAM*** ``), once however many ask.
    """

    action: Action
    reason: str = ""
    score: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    target: str | None = None
    code: int | None = None
    enhanced: str | None = None
    subject_prefix: str = ""

    @classmethod
    def reject(cls, reason: str, code: int = 554, enhanced: str = "5.7.1") -> Verdict:
        return cls(Action.REJECT, reason, code=code, enhanced=enhanced)

    @classmethod
    def defer(cls, reason: str, code: int = 451, enhanced: str = "4.7.1") -> Verdict:
        return cls(Action.DEFER, reason, code=code, enhanced=enhanced)


CONTINUE = Verdict(Action.CONTINUE)
ACCEPT = Verdict(Action.ACCEPT)
