"""Clients for the content scanners the gateway asks: spamd (SpamAssassin) and clamd (ClamAV).

Each is a small non-blocking Twisted client speaking the daemon's own protocol
(`gateway.scanners.spamd`: SPAMC/1.5; `gateway.scanners.clamd`: INSTREAM) over a
Twisted client endpoint string (``tcp:127.0.0.1:783``, ``unix:/run/clamav/clamd.ctl``),
with a limit on connections at once, a connect timeout and an overall timeout
(`gateway.scanners._connection.ScannerConnections`).

A scanner that cannot give an answer fails the Deferred with a `ScannerError`:
the filters let it through to the chain runner, which applies the filter's failure
verdict (DEFER by default). A broken scanner never reads as "clean".
"""

from __future__ import annotations

__all__ = [
    "ScannerError",
    "ScannerProtocolError",
    "ScannerTimeout",
    "ScannerTooLarge",
    "ScannerUnavailable",
]


class ScannerError(Exception):
    """A scanner gave no usable answer; the message names the scanner and what went wrong."""


class ScannerUnavailable(ScannerError):
    """The daemon could not be reached, or the connection broke before its answer."""


class ScannerTimeout(ScannerError):
    """No free connection, no connection, or no answer in the time allowed."""


class ScannerProtocolError(ScannerError):
    """The daemon answered with an error, or with something this client does not understand."""


class ScannerTooLarge(ScannerError):
    """The daemon refused to scan this much (clamd's StreamMaxLength): the content is unscanned."""
