"""Settings and small pure pieces of the SMTP server: EHLO keywords, Received header."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from gateway.model import Envelope, Recipient, Role, Session, peer_address
from gateway.smtp.reply import Reply


@attrs.frozen
class ServerSettings:
    """What one SMTP listener enforces; every default here is the seed's.

    Line lengths: a command line (and an AUTH response line) may have
    `max_line_length` octets including CRLF (RFC 5321 4.5.3.1.4 and .6); a longer
    one is answered ``500 5.5.6`` and skipped without being buffered. Message data
    lines are *not* limited (real mail breaks the 1000-octet rule often enough
    that refusing it would lose mail; the outbound client folds or uses
    BINARYMIME): the server keeps at most `data_chunk_size` octets of a partial
    data line and hands the rest to the spool as it comes.

    Bare CR / bare LF in DATA (or in BDAT without BODY=BINARYMIME): with
    `reject_bare_lf` the message is read to its real end (CRLF.CRLF) and refused
    with ``550 5.5.2``; without it, each bare CR or LF is stored as CRLF. Either
    way the stored message never contains one, and a lone LF never ends the data.
    """

    hostname: str = attrs.field(factory=socket.getfqdn)
    banner: str = "ESMTP MailGate"
    max_recipients: int = 16
    max_message_size: int = 100 * 1024 * 1024
    max_hops: int = 32  # more Received: headers than this -> 554 5.4.6
    idle_timeout: float = 300.0  # seconds without a byte from the client -> 421 4.4.2
    max_commands: int = 1000  # per connection (BDAT chunks with data do not count)
    max_errors: int = 10  # 4xx/5xx replies before 421 and disconnect
    max_line_length: int = 1000  # command line, CRLF included
    data_chunk_size: int = 64 * 1024  # most of a partial data line kept in memory
    vrfy_enabled: bool = False  # VRFY answers 502 when off, 252 when on
    etrn_enabled: bool = True  # ETRN (RFC 1985) for clients that may relay: flush and fetch now
    reject_bare_lf: bool = True
    auth_requires_tls: bool = True  # AUTH advertised and accepted only after STARTTLS
    tls_required: bool = False  # MAIL refused before STARTTLS (a submission port)
    max_auth_failures: int = 5  # failed AUTH attempts before 421 and disconnect
    auth_failure_delay: float = 1.0  # seconds before answering a failed AUTH
    soft_error_limit: int = 5  # errors after which each error reply waits error_delay (tarpit)
    error_delay: float = 1.0


class IncomingMessage(Protocol):
    """The part of `gateway.interfaces.IIncomingMessage` the server uses."""

    @property
    def queue_id(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class SessionChecks(Protocol):
    """`gateway.reception.SessionChecks` as the server sees it: one per connection."""

    def connect(self, session: Session) -> Deferred[Reply | None]: ...

    def helo(self, session: Session) -> Deferred[Reply | None]: ...

    def mail(self, session: Session, envelope: Envelope) -> Deferred[Reply | None]: ...

    def rcpt(self, session: Session, envelope: Envelope, recipient: Recipient) -> Deferred[Reply | None]: ...

    def auth_allowed(self, session: Session) -> Deferred[Reply | None]: ...

    def auth_result(self, session: Session, user: str, success: bool) -> float: ...

    def header_block(self) -> bytes: ...

    def new_message(self, session: Session) -> Any: ...

    def accept(self, session: Session, envelope: Envelope, message: Any) -> Deferred[Reply]: ...

    def etrn(self, session: Session, domain: str) -> Reply: ...

    def close(self) -> None: ...


class Reception(Protocol):
    """`gateway.interfaces.IReception`, as a structural type for mypy."""

    def open_session(self, session: Session, counts: Callable[[], dict[str, int]]) -> SessionChecks: ...


class _NoChecks:
    """Before connectionMade: a session nobody has checked yet (never used for mail)."""

    def close(self) -> None:
        pass


NO_CHECKS: Any = _NoChecks()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def in_networks(host: str, networks: tuple[Network, ...]) -> bool:
    """Whether an IP address (text, IPv4-mapped IPv6 allowed) is in one of the networks."""
    address = peer_address(host)
    if address is None:
        return False
    return any(address in network for network in networks)


_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def protocol_name(session: Session, envelope: Envelope) -> str:
    """The ``with`` keyword of the Received header (RFC 3848, RFC 6531)."""
    if not session.esmtp:
        return "SMTP"
    name = "UTF8SMTP" if envelope.smtputf8 else "ESMTP"
    if session.tls:
        name += "S"
    if session.authenticated_user is not None:
        name += "A"
    return name


def received_header(
    session: Session, envelope: Envelope, *, hostname: str, queue_id: str, now: float
) -> bytes:
    """Our trace header (RFC 5321 4.4), the first bytes of every stored message."""
    helo = _UNSAFE_HELO.sub("_", session.helo or "unknown")[:255]
    tls = f" (using {session.tls_cipher})" if session.tls and session.tls_cipher else ""
    date = datetime.fromtimestamp(now, tz=UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    lines = [
        f"Received: from {helo} ([{session.peer_host}]){tls}",
        f"\tby {hostname} with {protocol_name(session, envelope)} id {queue_id}",
    ]
    if len(envelope.rcpt_to) == 1:
        lines.append(f"\tfor <{envelope.rcpt_to[0].address}>; {date}")
    else:
        lines[-1] += f"; {date}"
    text = "\r\n".join(lines) + "\r\n"
    return text.encode("utf-8", "replace")


def may_etrn(session: Session) -> bool:
    """ETRN is for the internal servers: submission listeners, relay.networks, AUTH users."""
    return session.role is Role.SUBMISSION or session.may_relay


def ehlo_keywords(
    settings: ServerSettings,
    session: Session,
    *,
    can_start_tls: bool,
    auth_mechanisms: tuple[str, ...],
) -> list[str]:
    """The extensions to advertise to this session, in EHLO order."""
    keywords = [
        "PIPELINING",
        f"SIZE {settings.max_message_size}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
    ]
    if settings.vrfy_enabled:
        keywords.append("VRFY")
    if settings.etrn_enabled and may_etrn(session):
        keywords.append("ETRN")
    if can_start_tls and not session.tls:
        keywords.append("STARTTLS")
    auth_allowed = session.tls or not settings.auth_requires_tls
    if auth_mechanisms and auth_allowed and session.authenticated_user is None:
        keywords.append("AUTH " + " ".join(auth_mechanisms))
    return keywords
