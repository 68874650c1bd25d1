"""Connections and TLS for the fetch clients (POP3 and IMAP share this).

`connect()` opens one connection to an account's server: plain TCP, or TLS
from the first byte when the account says "implicit" (POP3S, IMAPS).
`client_tls_options()` gives the options both ways of starting TLS use: the
chain checked against the account's CA file (or the system's roots) and the
name (`tls_name`, or `host`) checked with service-identity, unless the account
turned verification off. `TlsStage` follows TLS on one connection, starts the
STLS/STARTTLS upgrade, and names a lost connection for what it was: a refused
certificate or a failed handshake is `TlsRefused`, anything else `FetchError`.

The protocols do the rest themselves: the upgrade is asked for by a command
whose positive answer must be the last thing the server sends in plain text
(anything after it is an injection attempt and the protocol refuses it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TypeVar

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from gateway.delivery.tls import load_trust_roots
from gateway.fetch import FetchError, MailboxAccount, TlsRefused

__all__ = [
    "TLS_MODES",
    "TlsStage",
    "client_tls_options",
    "connect",
    "describe",
    "endpoint",
    "tls_detail",
]

TLS_MODES = ("implicit", "starttls", "none")

ProtocolT = TypeVar("ProtocolT", bound=Protocol)


def describe(account: MailboxAccount) -> str:
    """The server as error messages name it: "pop.example.net:995" ("[::1]:995")."""
    host = f"[{account.host}]" if ":" in account.host else account.host
    return f"{host}:{account.port}"


def client_tls_options(account: MailboxAccount) -> IOpenSSLClientConnectionCreator:
    """TLS options for this account's server (TLS 1.2 at least).

    verify: the chain against `ca_file` (or the system's roots) and the name
    `tls_name` (default `host`; an IP address is matched against the
    certificate's IP SANs) with service-identity. verify off: any certificate
    (the account's explicit choice, e.g. a self-signed server on a LAN).
    A CA file that cannot be read is `TlsRefused` naming the file.
    """
    if account.verify:
        try:
            trust = load_trust_roots(account.ca_file)
        except (OSError, ValueError, SSL.Error) as error:
            raise TlsRefused(
                f"{describe(account)}: cannot load the CA file {account.ca_file!r}: {error}"
            ) from error
        return ssl.optionsForClientTLS(
            account.tls_name or account.host,
            trustRoot=trust,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )
    unverified = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    return unverified  # provides IOpenSSLClientConnectionCreator too


def endpoint(account: MailboxAccount, reactor: object) -> IStreamClientEndpoint:
    """The endpoint for the account's server: TLS-wrapped when `tls` is "implicit"."""
    if account.tls not in TLS_MODES:
        raise FetchError(
            f"{describe(account)}: unknown TLS mode {account.tls!r} (one of {', '.join(TLS_MODES)})"
        )
    timeout = max(1, int(account.timeout))
    tcp: IStreamClientEndpoint
    try:
        address = ipaddress.ip_address(account.host)
    except ValueError:  # a name: resolved, every address tried (happy eyeballs)
        tcp = HostnameEndpoint(reactor, account.host, account.port, timeout=timeout)
    else:  # an address: no resolver (nor its thread pool) involved
        kind = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
        tcp = kind(reactor, str(address), account.port, timeout=timeout)
    if account.tls == "implicit":
        return wrapClientTLS(client_tls_options(account), tcp)
    return tcp


def connect(account: MailboxAccount, reactor: object, build: Callable[[], ProtocolT]) -> Deferred[ProtocolT]:
    """Connect to the account's server; fires with the protocol `build()` made.

    With implicit TLS the protocol is connected before the handshake is done:
    a refused certificate shows as the connection lost (see `TlsStage`). A
    connection that cannot be made fails with `FetchError` naming the server.
    Fails with `TlsRefused` if the TLS options cannot be made (CA file).
    """
    try:
        target = endpoint(account, reactor)
    except FetchError as error:
        failed: Deferred[ProtocolT] = Deferred()
        failed.errback(error)
        return failed
    connecting: Deferred[ProtocolT] = target.connect(Factory.forProtocol(build))  # type: ignore[assignment]

    def explain(reason: Failure) -> Failure:
        if isinstance(reason.value, FetchError):
            return reason
        if isinstance(reason.value, DNSLookupError):
            raise FetchError(f"cannot connect to {describe(account)}: host name not found")
        raise FetchError(f"cannot connect to {describe(account)}: {reason.getErrorMessage()}")

    connecting.addErrback(explain)
    return connecting


def tls_detail(reason: Failure | BaseException | None) -> str:
    """A short human text for why a TLS handshake failed (certificate or protocol)."""
    error = reason.value if isinstance(reason, Failure) else reason
    if error is None:
        return "connection closed during the TLS handshake"
    if isinstance(error, VerificationError):
        names = []
        for mismatch in error.errors:
            identity = getattr(mismatch, "mismatched_id", None)
            value = getattr(identity, "hostname", None) or getattr(identity, "ip", None) or identity
            names.append(value.decode("ascii", "replace") if isinstance(value, bytes) else str(value))
        return f"the server's certificate is not valid for {', '.join(names)}"
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        parts = [str(entry[2]) for entry in error.args[0] if isinstance(entry, tuple) and len(entry) == 3]
        if parts:
            return "; ".join(parts)
    text = str(error).strip()
    return text or type(error).__name__


class TlsStage:
    """Where TLS is on one connection: not started, handshaking, or done.

    A protocol makes one, calls `implicit()` when the account uses implicit
    TLS, `start(transport, options)` for an STLS/STARTTLS upgrade (after the
    server's positive answer), `completed()` from `handshakeCompleted`, and
    `lost_error()` from `connectionLost` to say what a lost connection means.
    """

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.started = False
        self.done = False

    @property
    def handshaking(self) -> bool:
        return self.started and not self.done

    @property
    def secure(self) -> bool:
        """TLS is up: passwords may be sent."""
        return self.done

    def implicit(self) -> None:
        self.started = True

    def start(self, transport: ITransport | None, options: IOpenSSLClientConnectionCreator) -> None:
        """Start the handshake on a plain connection (after the server's +OK / OK)."""
        tls = ITLSTransport(transport, None)
        if tls is None:
            raise TlsRefused(f"{self.peer}: this connection cannot start TLS")
        self.started = True
        tls.startTLS(options)

    def completed(self) -> None:
        self.done = True

    def lost_error(self, reason: Failure | None, stage: str) -> FetchError:
        """The error a lost connection means: `TlsRefused` while handshaking, else `FetchError`."""
        if self.handshaking:
            return TlsRefused(f"TLS with {self.peer} failed: {tls_detail(reason)}")
        detail = ""
        if reason is not None and not isinstance(reason.value, (ConnectionDone, ConnectionLost)):
            detail = f" ({reason.getErrorMessage()})"
        return FetchError(f"lost connection with {self.peer} while {stage}{detail}")
