"""A non-blocking client for clamd, ClamAV's daemon: INSTREAM over TCP or a UNIX socket.

One scan per connection::

    zINSTREAM\\0
    <4-byte big-endian length><that many bytes>   (as many chunks as needed)
    <0 0 0 0>                                     (the end of the stream)

answered ``stream: OK\\0``, ``stream: Eicar-Signature FOUND\\0``, or an error such as
``INSTREAM size limit exceeded. ERROR\\0`` (more than clamd's StreamMaxLength: clamd
stops reading and closes). The ``z`` prefix asks for answers ended by a NUL byte,
``n`` by a newline; both are supported (`delimiter`). ``PING`` (``PONG``) and
``VERSION`` serve health checks.

The content is read from a file object chunk by chunk as the connection takes it
(a pull producer), so a large message is never held in memory here.
"""

from __future__ import annotations

import io
import struct
from typing import IO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.scanners import ScannerProtocolError, ScannerTooLarge
from gateway.scanners._connection import ExchangeProtocol, ScannerConnections

__all__ = ["ClamdClient", "ClamdProtocol", "ClamdResult"]

CHUNK = 64 * 1024
MAX_REPLY = 64 * 1024  # an answer is one short line
_END = struct.pack(">I", 0)


@attrs.frozen
class ClamdResult:
    """What clamd found in one stream: nothing (`virus` None), or the name of what it found."""

    virus: str | None = None

    @property
    def infected(self) -> bool:
        return self.virus is not None


@implementer(IPullProducer)
class _StreamSender:
    """Writes a file object as INSTREAM chunks whenever the transport wants more."""

    def __init__(self, protocol: ClamdProtocol, source: IO[bytes], chunk: int = CHUNK) -> None:
        self.protocol = protocol
        self.source = source
        self.chunk = chunk
        self.sent = 0
        self.stopped = False

    def resumeProducing(self) -> None:
        transport = self.protocol.transport
        if self.stopped or transport is None:
            return
        block = self.source.read(self.chunk)
        if block:
            self.sent += len(block)
            transport.write(struct.pack(">I", len(block)) + block)
            return
        transport.write(_END)
        self._finish()
        transport.unregisterProducer()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.source.close()


class ClamdProtocol(ExchangeProtocol[str]):
    """One clamd command (with a stream for INSTREAM) and its one-line answer."""

    scanner = "clamd"

    def __init__(
        self, command: str, source: IO[bytes] | None = None, *, delimiter: str = "z", chunk: int = CHUNK
    ) -> None:
        super().__init__(MAX_REPLY)
        if delimiter not in ("z", "n"):
            raise ValueError(f"clamd delimiter must be 'z' (NUL) or 'n' (newline), not {delimiter!r}")
        self.command = command
        self.terminator = b"\0" if delimiter == "z" else b"\n"
        self.prefix = delimiter.encode()
        self.sender = _StreamSender(self, source, chunk) if source is not None else None

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.prefix + self.command.encode("ascii") + self.terminator)
        if self.sender is not None:
            self.transport.registerProducer(self.sender, False)  # type: ignore[attr-defined]

    def parse(self, reply: bytes, complete: bool) -> str | None:
        end = reply.find(self.terminator)
        if end < 0:
            return None
        return reply[:end].decode("utf-8", "replace").strip()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.sender is not None:
            self.sender.stopProducing()  # closes the file if the transport did not ask us to stop
        super().connectionLost(reason)


class ClamdClient:
    """Asks clamd at one endpoint to scan streams; PING and VERSION for health checks."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        address: str = "",
        max_connections: int = 10,
        connect_timeout: float = 5.0,
        timeout: float = 60.0,
        delimiter: str = "z",
        chunk: int = CHUNK,
    ) -> None:
        self.delimiter = delimiter
        self.chunk = chunk
        self.connections = ScannerConnections(
            "clamd",
            endpoint,
            clock,
            address=address,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            timeout=timeout,
        )

    def scan(self, content: bytes) -> Deferred[ClamdResult]:
        """Scan bytes in memory (an attachment's payload)."""
        return self.scan_stream(io.BytesIO(content))

    def scan_stream(self, source: IO[bytes]) -> Deferred[ClamdResult]:
        """Scan what `source` holds from where it stands to its end; `source` is closed after."""
        protocol = ClamdProtocol("INSTREAM", source, delimiter=self.delimiter, chunk=self.chunk)
        answer: Deferred[str] = self.connections.exchange(protocol)
        answer.addBoth(_closing, source)
        return answer.addCallback(_scan_result)

    def ping(self) -> Deferred[str]:
        answer: Deferred[str] = self.connections.exchange(ClamdProtocol("PING", delimiter=self.delimiter))
        return answer.addCallback(_expect_pong)

    def version(self) -> Deferred[str]:
        """clamd's version line ("ClamAV 1.4.6/27000/Mon Nov 23 2026")."""
        return self.connections.exchange(ClamdProtocol("VERSION", delimiter=self.delimiter))


def _closing(result: object, source: IO[bytes]) -> object:
    source.close()  # whatever happened (a refused turn never reached the producer)
    return result


def _scan_result(answer: str) -> ClamdResult:
    # "stream: OK", "stream: <name> FOUND", "<problem> ERROR"
    if answer.endswith(" ERROR") or answer.endswith(": ERROR"):
        if "size limit exceeded" in answer:
            raise ScannerTooLarge(f"clamd did not scan it: {answer} (clamd's StreamMaxLength)")
        raise ScannerProtocolError(f"clamd could not scan it: {answer}")
    label, colon, finding = answer.partition(":")
    finding = finding.strip()
    if not colon or label.strip() != "stream":
        raise ScannerProtocolError(f"clamd answered {answer[:200]!r}")
    if finding == "OK":
        return ClamdResult()
    if finding.endswith(" FOUND") and finding[: -len(" FOUND")].strip():
        return ClamdResult(virus=finding[: -len(" FOUND")].strip())
    raise ScannerProtocolError(f"clamd answered {answer[:200]!r}")


def _expect_pong(answer: str) -> str:
    if answer != "PONG":
        raise ScannerProtocolError(f"clamd answered PING with {answer[:200]!r}")
    return answer
