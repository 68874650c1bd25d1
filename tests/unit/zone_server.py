"""A small authoritative name server for tests, answering from a dict shaped like a zone.

`answer(query)` is the whole server as a function (the fake-reactor tests call it);
`ZoneServer` puts it on a loopback UDP port (and TCP on the same port, for truncated
answers), optionally slow (`delay`) or silent for some names.

The zone has the shape `StaticDnsLookups` takes, so one dict drives the fake and the
real `DnsLookups` through the same contract tests:
``{"example.test": {"A": ["192.0.2.1"], "MX": [(10, "mx.example.test")]},
"192.0.2.1": {"PTR": ["mx.example.test"]}, "broken.test": DnsTemporaryError(...)}``;
an IP key stands for its reverse name, an exception entry is SERVFAIL, a name not in
the dict is NXDOMAIN (with a SOA, whose minimum is `negative_ttl`, unless `soa` is off).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Container, Mapping
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol


def _key(name: str) -> str:
    try:
        return ipaddress.ip_address(name).reverse_pointer
    except ValueError:
        return name.rstrip(".").lower()


def _text(rdtype: str, value: Any) -> str:
    if rdtype == "MX":
        preference, host = value
        return f"{preference} {host.rstrip('.')}."
    if rdtype == "TXT":
        return '"' + str(value).replace('"', '\\"') + '"'
    if rdtype == "PTR":
        return str(value).rstrip(".") + "."
    return str(value)


class Zone:
    """The answers: a zone dict, TTLs, and which names get no answer or a truncated one."""

    def __init__(
        self,
        records: Mapping[str, Any],
        *,
        origin: str = "test",
        ttl: int = 300,
        negative_ttl: int = 60,
        soa: bool = True,
        ttls: Mapping[str, int] | None = None,
        truncate: Container[str] = (),
    ) -> None:
        self.records = {_key(name): entry for name, entry in records.items()}
        self.origin = origin
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.soa = soa
        self.ttls = {_key(name): value for name, value in (ttls or {}).items()}
        self.truncate = truncate
        self.queries: list[tuple[str, str]] = []

    def answer(self, query: dns.message.Message, *, over_tcp: bool = False) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        entry = self.records.get(name)
        if isinstance(entry, Exception):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response)
            return response
        values = entry.get(rdtype, ())
        if not values:
            self._add_soa(response)  # NODATA
            return response
        if name in self.truncate and not over_tcp:
            response.flags |= dns.flags.TC
            return response
        texts = [_text(rdtype, value) for value in values]
        ttl = self.ttls.get(name, self.ttl)
        response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, *texts))
        return response

    def _add_soa(self, response: dns.message.Message) -> None:
        if self.soa:
            soa = f"ns.{self.origin}. hostmaster.{self.origin}. 1 3600 600 86400 {self.negative_ttl}"
            response.authority.append(dns.rrset.from_text(f"{self.origin}.", 3600, "IN", "SOA", soa))


class ZoneServer(DatagramProtocol):
    """`Zone` on a UDP port: answers at once, after `delay` seconds, or never (`silent(name)`)."""

    def __init__(
        self,
        zone: Zone,
        reactor: Any,
        *,
        delay: Callable[[str], float] | None = None,
        silent: Callable[[str], bool] | None = None,
    ) -> None:
        self.zone = zone
        self.reactor = reactor
        self.delay = delay or (lambda name: 0.0)
        self.silent = silent or (lambda name: False)
        self.received = 0
        self.udp: Any = None
        self.tcp: Any = None
        self.later: list[Any] = []  # delayed answers (IDelayedCall)

    def listen(self, interface: str = "127.0.0.1") -> str:
        """Start on a free port (UDP and TCP); returns "127.0.0.1:PORT"."""
        from twisted.internet.error import CannotListenError

        factory = Factory.forProtocol(lambda: _TcpServer(self.zone))
        for _attempt in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((interface, 0))  # a port free for UDP now
                port = probe.getsockname()[1]
            try:
                self.tcp = self.reactor.listenTCP(port, factory, interface=interface)
            except CannotListenError:  # taken for TCP (an earlier test's): try another
                continue
            try:
                # the protocol (self) is connected only when the bind succeeds: a retry may reuse it
                self.udp = self.reactor.listenUDP(port, self, interface=interface)
            except CannotListenError:  # taken for UDP in the meantime
                self.tcp.stopListening()
                continue
            self._grow_receive_buffer()
            return f"{interface}:{port}"
        raise RuntimeError("no port free for both UDP and TCP")

    def _grow_receive_buffer(self) -> None:
        """Room for a burst of a thousand questions: the kernel's default holds a few hundred."""
        sock = getattr(self.udp, "socket", None)
        if sock is None:
            return
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
                return
            except OSError:
                continue  # SO_RCVBUFFORCE needs root; SO_RCVBUF is capped by net.core.rmem_max

    def stop(self) -> Any:
        from twisted.internet.defer import gatherResults, maybeDeferred

        for call in self.later:
            if call.active():
                call.cancel()
        return gatherResults([maybeDeferred(port.stopListening) for port in (self.udp, self.tcp) if port])

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received += 1
        query = dns.message.from_wire(datagram)
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        if self.silent(name):
            return
        wire = self.zone.answer(query).to_wire()
        delay = self.delay(name)
        if delay:
            self.later = [call for call in self.later if call.active()]
            self.later.append(self.reactor.callLater(delay, self._send, wire, addr))
        else:
            self._send(wire, addr)

    def _send(self, wire: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.write(wire, addr)


class _TcpServer(Protocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        # Every query on the connection (RFC 7766: c-ares sends several on one).
        self.buffer += data
        while len(self.buffer) >= 2:
            (size,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + size:
                return
            query = dns.message.from_wire(self.buffer[2 : 2 + size])
            self.buffer = self.buffer[2 + size :]
            wire = self.zone.answer(query, over_tcp=True).to_wire()
            assert self.transport is not None
            self.transport.write(struct.pack("!H", len(wire)) + wire)
