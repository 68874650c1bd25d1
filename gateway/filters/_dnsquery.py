"""Asking name servers: one question, one answer, over UDP (over TCP when truncated).

The wire side of `gateway.filters.dns`. dnspython builds and parses the
messages; Twisted carries them, so nothing here blocks or needs a thread:
a thousand questions in flight are a thousand small objects and a few sockets.

- Questions go out from a small pool of UDP sockets per address family, each
  bound to a random port by the kernel and retired after a number of uses; each
  question has a random 16-bit id (from the kernel's CSPRNG, read in bulk:
  `_dnswire.RandomPool`). An answer is taken only from the server the
  question went to, with the id and the question it was asked with (RFC 5452),
  so a spoofer must guess port, id and name at once.
- The common answers are read by hand (`_dnswire.parse_reply`), the others by
  dnspython; both check id, header and question the same way.
- Each question wakes for its next retransmission, or its deadline when that
  comes first; the querier keeps these wake-ups on one heap under one reactor
  timer (`DnsQuerier._wake`), not a DelayedCall each: the main process asks
  three questions for every new client of every SMTP worker, and a DelayedCall
  made and cancelled for each cost it more than the rest of the question's
  timekeeping.
- A question is retransmitted with a doubling interval, turning to the next
  name server each time, until the deadline: then it fails with
  `DnsTemporaryError`.
- SERVFAIL, REFUSED and the like from one server send the question to the next
  one at once; when every server has refused, the question fails.
- A truncated answer is asked again over TCP; a FORMERR to an EDNS question is
  asked again without EDNS (old DNSBL servers).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import ipaddress
import itertools
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.python.failure import Failure

from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters._dnswire import RANDOM, Reply, parse_reply

Server = tuple[str, int]  # (ip, port)
Response = dns.message.Message | Reply  # NOERROR or NXDOMAIN, read by dnspython or by hand
Notify = Callable[[Response | DnsTemporaryError], None]

EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation
SOCKETS_PER_FAMILY = 8
USES_PER_SOCKET = 2000  # then the socket is closed and a new random port taken
FIRST_RETRY = 1.0  # seconds before the first retransmission; it doubles


def parse_nameserver(text: str) -> Server:
    """ "192.0.2.53", "127.0.0.1:5353", "2001:db8::53" or "[::1]:5353" -> (ip, port)."""
    host, port = text.strip(), 53
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not a name server address")
            port = int(rest[1:])
    elif host.count(":") == 1:
        host, _, number = host.partition(":")
        port = int(number)
    ipaddress.ip_address(host)  # ValueError for a host name: we need no DNS to find DNS
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def wire_name(name: str) -> bytes | None:
    """A name in DNS wire form, lower case; None when it cannot be a DNS name.

    Written by hand rather than with dnspython: this is on the path of every
    DNSBL question, and dnspython's Name objects cost several times more.
    """
    return normal_wire_name(name.strip().rstrip(".").lower())


def normal_wire_name(text: str) -> bytes | None:
    """`wire_name` of a name already lower case, without blanks or a trailing dot."""
    if not text:
        return None
    try:
        encoded = text.encode("ascii")
    except UnicodeEncodeError:
        try:
            encoded = text.encode("idna")  # IDNA 2003, as dnspython's default
        except UnicodeError:
            return None
    wire = bytearray()  # a loop over a bytearray: half the time of joins over generators
    for label in encoded.split(b"."):
        size = len(label)
        if not 0 < size < 64:
            return None
        wire.append(size)
        wire += label
    wire.append(0)
    return bytes(wire) if len(wire) <= 255 else None


_QUERY_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_OPT = b"\x00" + struct.pack("!HHIH", 41, EDNS_PAYLOAD, 0, 0)  # the root's OPT, no options


def query_wire(query_id: int, qname: bytes, rdtype: int, *, edns: bool) -> bytes:
    """A recursive query for (qname, rdtype, IN), with an EDNS0 OPT record when `edns`."""
    header = _QUERY_HEADER.pack(query_id, 0x0100, 1, 0, 0, 1 if edns else 0)  # RD
    question = qname + _QUESTION_TAIL.pack(rdtype, 1)
    return header + question + _OPT if edns else header + question


@functools.lru_cache(maxsize=64)
def _family(server: Server) -> int:
    """4 or 6 for a name server (there are a few, asked thousands of times a second)."""
    return ipaddress.ip_address(server[0]).version


class _Socket(DatagramProtocol):
    """One UDP socket of the pool: the questions that went out on it, by id."""

    noisy = False  # sockets come and go: not worth a log line each

    def __init__(self, querier: DnsQuerier, family: int) -> None:
        self.querier = querier
        self.family = family
        self.pending: dict[int, _Question] = {}
        self.uses = 0
        self.port: Any = None  # IListeningPort
        self.raw: Any = None  # its socket.socket, when it has one (not in tests' fakes)

    def allocate(self, question: _Question) -> int:
        while True:
            query_id = RANDOM.number()
            if query_id not in self.pending:
                self.pending[query_id] = question
                self.uses += 1
                return query_id

    def release(self, query_id: int) -> None:
        self.pending.pop(query_id, None)
        if not self.pending and self.uses >= USES_PER_SOCKET:
            self.querier._retire(self)

    def send(self, wire: bytes, server: Server) -> None:
        """Send a question; OSError when the kernel will not.

        Straight to the socket when there is one: Twisted's `write` checks that
        the address is an IP address of the socket's family every time, and
        ours were checked once, when the configuration was read.
        """
        if self.raw is not None:
            self.raw.sendto(wire, server)
        else:
            self.transport.write(wire, server)  # type: ignore[union-attr]

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) < 12:
            return
        query_id = datagram[0] << 8 | datagram[1]
        question = self.pending.get(query_id)
        if question is not None:
            question.received(self, query_id, datagram, (addr[0], addr[1]))


class _TcpAnswer(Protocol):
    """One question over TCP: length-prefixed out, length-prefixed back."""

    def __init__(self, wire: bytes, answered: Deferred[bytes]) -> None:
        self.wire = wire
        self.answered = answered
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(struct.pack("!H", len(self.wire)) + self.wire)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 2:
            (size,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) >= 2 + size and not self.answered.called:
                assert self.transport is not None
                self.answered.callback(self.buffer[2 : 2 + size])
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.answered.called:
            self.answered.errback(reason if reason is not None else ConnectionError("closed"))


class _TcpFactory(ClientFactory):
    noisy = False

    def __init__(self, wire: bytes, answered: Deferred[bytes]) -> None:
        self.wire = wire
        self.answered = answered

    def buildProtocol(self, addr: Any) -> Protocol:
        return _TcpAnswer(self.wire, self.answered)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.answered.called:
            self.answered.errback(reason)


class _Question:
    """One question in flight: its sends, retransmissions, deadline and answer."""

    def __init__(self, querier: DnsQuerier, name: str, qname: bytes, rdtype: int, notify: Notify) -> None:
        self.querier = querier
        self.name = name
        self.qname = qname  # wire form, lower case
        self.rdtype = rdtype
        self.notify = notify  # called once, with the response or the DnsTemporaryError
        self.done = False
        self.servers = querier.nameservers
        # spread the load over the servers
        self.turn = RANDOM.below(len(self.servers)) if len(self.servers) > 1 else 0
        self.failed: set[Server] = set()
        self.no_edns: set[Server] = set()
        self.sent: dict[tuple[_Socket, int], tuple[Server, bool]] = {}  # -> (server, with EDNS)
        self.interval = querier.first_interval
        self.deadline = querier.clock.seconds() + querier.timeout
        self.wake = 0  # which of its entries on the querier's heap is the live one
        self.timer_is_deadline = False  # whether the next wake-up is the deadline
        self.tcp = False  # asking over TCP: no UDP retransmissions meanwhile
        self.connector: Any = None  # the TCP connection's IConnector

    def describe(self) -> str:
        return f"{self.name}/{dns.rdatatype.to_text(dns.rdatatype.RdataType.make(self.rdtype))}"

    # -- time -------------------------------------------------------------------------------

    def _wake_in(self, seconds: float) -> None:
        """Retransmit in `seconds`, or give up at the deadline if that comes first."""
        when = self.querier.clock.seconds() + seconds
        self.timer_is_deadline = when >= self.deadline
        self.querier._wake(self, self.deadline if self.timer_is_deadline else when)

    def _woken(self) -> None:
        if self.timer_is_deadline:
            self._timed_out()
        else:
            self.send_next()

    # -- sending ----------------------------------------------------------------------------

    def send_next(self) -> None:
        """Ask the next server that has not refused; retransmit later unless answered."""
        if self.done or self.tcp:
            return
        candidates = [s for s in self.servers if s not in self.failed] if self.failed else self.servers
        if not candidates:
            self._finish(DnsTemporaryError(f"{self.describe()}: every name server refused or failed"))
            return
        server = candidates[self.turn % len(candidates)]
        self.turn += 1
        self._send(server)
        if not self.done:
            self._wake_in(self.interval)
            self.interval *= 2

    def _send(self, server: Server) -> None:
        try:
            sock = self.querier._socket(_family(server))
        except Exception as error:  # no IPv6 here, out of file descriptors: that server is unusable
            self.failed.add(server)
            self.querier.log_problem(f"cannot open a UDP socket for {server[0]}: {error}")
            self.querier.clock.callLater(0, self.send_next)
            return
        query_id = sock.allocate(self)
        edns = server not in self.no_edns
        self.sent[sock, query_id] = (server, edns)
        try:
            sock.send(query_wire(query_id, self.qname, self.rdtype, edns=edns), server)
        except OSError as error:
            sock.release(query_id)
            del self.sent[sock, query_id]
            self.failed.add(server)
            self.querier.log_problem(f"cannot send to {server[0]}:{server[1]}: {error}")
            self.querier.clock.callLater(0, self.send_next)

    def _matches(self, response: dns.message.Message, query_id: int) -> bool:
        """Is this the answer to our question (RFC 5452: id, and the question echoed)?"""
        if response.id != query_id or not response.flags & dns.flags.QR or response.opcode() != 0:
            return False
        if len(response.question) != 1:
            return False
        question = response.question[0]
        echoed = question.name.to_wire()
        return (
            question.rdtype == self.rdtype
            and question.rdclass == dns.rdataclass.IN
            and echoed is not None
            and echoed.lower() == self.qname
        )

    # -- answers ----------------------------------------------------------------------------

    def received(self, sock: _Socket, query_id: int, datagram: bytes, addr: Server) -> None:
        sent = self.sent.get((sock, query_id))
        if sent is None or not _same_server(sent[0], addr):
            return  # not from the server we asked: ignore, as a spoofed answer would be
        server, edns = sent
        response: Response | None = parse_reply(datagram, query_id, self.qname, self.rdtype)
        if response is None:  # not one of the common shapes: dnspython reads it and decides
            try:
                response = dns.message.from_wire(datagram)
            except (dns.exception.DNSException, ValueError, UnicodeError):
                return  # garbage: wait for a real answer or the deadline
            if not self._matches(response, query_id):
                return
            if response.flags & dns.flags.TC:
                sock.release(query_id)
                del self.sent[sock, query_id]
                if not self.tcp:
                    self._ask_over_tcp(server, edns)
                return
        sock.release(query_id)
        del self.sent[sock, query_id]
        self.answered(server, edns, response)

    def answered(self, server: Server, edns: bool, response: Response) -> None:
        rcode = response.rcode if isinstance(response, Reply) else response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._finish(response)
        elif rcode == dns.rcode.FORMERR and edns and server not in self.no_edns:
            self.no_edns.add(server)  # an old server that does not know EDNS
            self._send(server)
        else:
            self.failed.add(server)
            problem = dns.rcode.to_text(dns.rcode.Rcode.make(rcode))
            self.querier.log_problem(f"{server[0]}:{server[1]} answered {problem} for {self.describe()}")
            if self.tcp:
                self.tcp = False
            self.send_next()

    def _ask_over_tcp(self, server: Server, edns: bool) -> None:
        self.tcp = True
        self._wake_in(math.inf)  # no retransmissions meanwhile: only the deadline
        answered: Deferred[bytes] = Deferred()
        remaining = max(1.0, self.deadline - self.querier.clock.seconds())
        query_id = RANDOM.number()
        wire = query_wire(query_id, self.qname, self.rdtype, edns=edns)
        self.connector = self.querier.reactor.connectTCP(
            server[0], server[1], _TcpFactory(wire, answered), remaining
        )

        def parsed(wire: bytes) -> None:
            if self.done:
                return
            try:
                response = dns.message.from_wire(wire)
            except (dns.exception.DNSException, ValueError, UnicodeError) as error:
                failed(str(error))
                return
            if not self._matches(response, query_id):
                failed("the answer does not match the question")
                return
            self.answered(server, edns, response)

        def failed(problem: str) -> None:
            if self.done:
                return
            self.tcp = False
            self.connector = None
            self.failed.add(server)
            self.querier.log_problem(
                f"TCP to {server[0]}:{server[1]} for {self.describe()} failed: {problem}"
            )
            self.send_next()

        answered.addCallbacks(parsed, lambda failure: failed(failure.getErrorMessage()))

    def _timed_out(self) -> None:
        servers = ", ".join(f"{host}:{port}" for host, port in self.servers)
        self._finish(
            DnsTemporaryError(
                f"{self.describe()}: no answer within {self.querier.timeout:g} s from {servers}"
            )
        )

    def cancel(self, reason: str) -> None:
        self._finish(DnsTemporaryError(f"{self.describe()}: {reason}"))

    def _finish(self, outcome: Response | DnsTemporaryError) -> None:
        if self.done:
            return
        self.done = True
        for sock, query_id in list(self.sent):
            sock.release(query_id)
        self.sent.clear()
        self.wake += 1  # its entry on the querier's heap is void
        if self.connector is not None:
            self.connector.disconnect()  # a TCP answer still coming is not wanted any more
            self.connector = None
        self.querier._done(self)
        self.notify(outcome)


def _same_server(expected: Server, got: Server) -> bool:
    if expected[1] != got[1]:
        return False
    if expected[0] == got[0]:
        return True  # the usual case, without parsing both addresses
    try:
        return ipaddress.ip_address(expected[0]) == ipaddress.ip_address(got[0].split("%")[0])
    except ValueError:
        return False


class DnsQuerier:
    """Sends questions to the configured name servers; see the module docstring.

    `reactor` provides UDP, TCP and time (tests give a fake with a Clock).
    """

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[Server],
        timeout: float = 5.0,
        *,
        log_problem: Any = None,
    ) -> None:
        if not nameservers:
            raise ValueError("no name servers")
        self.reactor = reactor
        self.clock = reactor
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.first_interval = min(FIRST_RETRY, timeout / 3)  # before a question's first retransmission
        self.log_problem = log_problem or (lambda text: None)
        self.sockets: dict[int, list[_Socket]] = {4: [], 6: []}
        self.retired: list[_Socket] = []
        self.in_flight: set[_Question] = set()
        # when questions wake (see _wake): (time, order, question, its wake number), a heap
        self._wakeups: list[tuple[float, int, _Question, int]] = []
        self._order = itertools.count()  # for questions that wake at the same time
        self._timer: Any = None  # the reactor's IDelayedCall for the first live wake-up
        self._timer_at = math.inf
        self._together: dict[int, _Socket] | None = None  # inside together(): the socket per family

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Questions asked inside go out on one socket per family (a DNSBL score's zones).

        Their answers then come back together, read in one go rather than one
        wake-up of the reactor each. Each question still has its own random id,
        and the socket its random port.
        """
        self._together = {}
        try:
            yield
        finally:
            self._together = None

    def query(self, name: str, rdtype: str | int) -> Deferred[Response]:
        """The name servers' answer (NOERROR or NXDOMAIN); `DnsTemporaryError` otherwise.

        ValueError when `name` cannot be a DNS name (see `wire_name`).
        """
        qname = wire_name(name)
        if qname is None:
            raise ValueError(f"{name!r} is not a DNS name")
        result: Deferred[Response] = Deferred()

        def notify(outcome: Response | DnsTemporaryError) -> None:
            if isinstance(outcome, Exception):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self.ask(name.strip().rstrip(".").lower(), qname, dns.rdatatype.RdataType.make(rdtype), notify)
        return result

    def ask(self, name: str, qname: bytes, rdtype: int, notify: Notify) -> None:
        """`query` without a Deferred, for `DnsLookups`: `notify` gets the response or the error.

        `name` is the normal text form (for messages), `qname` its `wire_name`.
        """
        question = _Question(self, name, qname, rdtype, notify)
        self.in_flight.add(question)
        question.send_next()

    def _socket(self, family: int) -> _Socket:
        together = self._together
        if together is not None:
            sock = together.get(family)
            if sock is None or sock.uses + 1 >= USES_PER_SOCKET:
                sock = together[family] = self._any_socket(family)
            return sock
        return self._any_socket(family)

    def _any_socket(self, family: int) -> _Socket:
        pool = self.sockets[family]
        if len(pool) < SOCKETS_PER_FAMILY:
            sock = _Socket(self, family)
            interface = "::" if family == 6 else "0.0.0.0"
            sock.port = self.reactor.listenUDP(0, sock, interface=interface)
            sock.raw = getattr(sock.port, "socket", None)
            pool.append(sock)
            return sock
        sock = pool[RANDOM.below(len(pool))]
        if sock.uses + 1 >= USES_PER_SOCKET:
            pool.remove(sock)  # this is its last question; closed once its last answer is in
            self.retired.append(sock)
        return sock

    def _retire(self, sock: _Socket) -> None:
        if sock in self.sockets[sock.family]:
            return  # still in the pool: it gets more questions
        if sock in self.retired:
            self.retired.remove(sock)
            sock.port.stopListening()

    def _done(self, question: _Question) -> None:
        self.in_flight.discard(question)
        if not self.in_flight:  # nothing waits: no timer left behind
            self._wakeups.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                self._timer_at = math.inf

    def _wake(self, question: _Question, when: float) -> None:
        """Wake `question` (its `_woken`) at `when`, instead of when it was to wake.

        The entry goes on a heap, and only the first entry that is still live
        has a reactor timer. An answered question leaves its entry behind,
        void (its wake number has moved on), to be dropped when it comes to the
        top: a push and a pop are far cheaper than a DelayedCall and its cancel.
        """
        question.wake += 1
        heapq.heappush(self._wakeups, (when, next(self._order), question, question.wake))
        if when < self._timer_at:
            self._arm(when)
        if len(self._wakeups) > 2 * len(self.in_flight) + 4096:
            # no live entry came due for a long time: drop the void ones now
            self._wakeups[:] = [entry for entry in self._wakeups if entry[3] == entry[2].wake]
            heapq.heapify(self._wakeups)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._woken)
        self._timer_at = when

    def _woken(self) -> None:
        """The timer: wake the questions whose time has come, then set it for the next live one."""
        self._timer = None
        self._timer_at = math.inf
        now = self.clock.seconds() + 1e-6  # the reactor may run a call a rounding error early
        heap = self._wakeups
        while heap:
            when, _order, question, wake = heap[0]
            if wake != question.wake:
                heapq.heappop(heap)  # answered, or set to wake at another time
            elif when > now:
                break
            else:
                heapq.heappop(heap)
                question.wake += 1
                question._woken()  # may put it back on the heap, or end the last question
        if heap and heap[0][0] < self._timer_at:
            self._arm(heap[0][0])

    @property
    def open_sockets(self) -> int:
        return sum(len(pool) for pool in self.sockets.values()) + len(self.retired)

    def close(self) -> Deferred[Any]:
        """Fail what is in flight and close every socket (service stop, tests)."""
        for question in list(self.in_flight):
            question.cancel("the resolver is shutting down")
        stopping = []
        for sock in [*self.sockets[4], *self.sockets[6], *self.retired]:
            result = sock.port.stopListening()
            if isinstance(result, Deferred):
                stopping.append(result)
        self.sockets = {4: [], 6: []}
        self.retired = []
        return DeferredList(stopping)
