"""Poll mode: fetching mail from external mailboxes (POP3, IMAP) into the queue.

This module holds the seam between the protocol clients and the poller that
uses them (issue 5). A client connects and logs in to one mailbox (a POP3
maildrop, or one IMAP folder) and gives an `IMailboxSession`: list what is
there, retrieve one message into a writer (the spool's incoming message), mark
messages for deletion, and close. The poller decides what to fetch (by UID,
against the seen-UID store) and deletes only what is durable in the spool.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "AuthenticationFailed",
    "FetchError",
    "IMailboxSession",
    "MailboxAccount",
    "ProtocolViolation",
    "RemoteMessage",
    "TlsRefused",
]


class FetchError(Exception):
    """A fetch failed; the message says what and with whom (never a password)."""


class AuthenticationFailed(FetchError):
    """The server refused the credentials (counted per account: repeated ones raise an alert)."""


class TlsRefused(FetchError):
    """TLS could not be set up as the account requires (no STLS/STARTTLS, certificate refused)."""


class ProtocolViolation(FetchError):
    """The server said something the protocol does not allow (or too much of it)."""


@attrs.frozen
class MailboxAccount:
    """What a client needs to reach and open one mailbox (the poller's account config, reduced).

    `tls`: "implicit" (POP3S 995 / IMAPS 993), "starttls" (STLS / STARTTLS, required:
    refused if the server does not offer it) or "none" (plain text, only with the
    account's explicit insecure flag, checked by the config). `verify`: check the
    server's certificate chain (against `ca_file`, or the system's roots) and its
    name (`tls_name`, default `host`) with service-identity.
    """

    host: str
    port: int
    username: str
    password: str = attrs.field(repr=False, default="")
    tls: str = "implicit"
    verify: bool = True
    ca_file: str = ""
    tls_name: str = ""
    auth: str = "auto"  # POP3: "user", "apop"; IMAP: "login", "plain"; "auto": the best offered
    folder: str = "INBOX"  # IMAP only
    timeout: float = 60.0  # seconds any one server answer may take


@attrs.frozen
class RemoteMessage:
    """One message in a remote mailbox: its unique id there and its size in octets."""

    uid: str  # POP3: the UIDL string; IMAP: "<uidvalidity>:<uid>" so a new UIDVALIDITY never matches
    size: int
    number: int = 0  # POP3 message number / IMAP sequence number, for the session's own use


class IMailboxSession(Interface):
    """A logged-in session with one mailbox. Every method returns a Deferred."""

    capabilities = Attribute("frozenset[str]: what the server announced (CAPA / CAPABILITY), upper case")

    def list_messages() -> Deferred[list[RemoteMessage]]:
        """What is in the mailbox now, in server order."""

    def retrieve(message: RemoteMessage, write: Callable[[bytes], None]) -> Deferred[int]:
        """The whole message, passed to `write` in pieces as it arrives (CRLF line
        ends; POP3 dot-unstuffed); fires with the octet count once it is complete.
        Nothing is marked read or deleted (IMAP: BODY.PEEK[])."""

    def delete(messages: list[RemoteMessage]) -> Deferred[None]:
        """Mark messages for deletion (POP3 DELE, IMAP \\Deleted); done at `close`."""

    def close() -> Deferred[None]:
        """End the session, committing deletions (POP3 QUIT; IMAP EXPUNGE of the
        deleted UIDs, then LOGOUT). A session dropped without close deletes nothing."""

    def abort() -> None:
        """Drop the connection at once (nothing deleted)."""


Writer = Callable[[bytes], None]
