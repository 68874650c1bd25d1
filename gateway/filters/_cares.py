"""Asking name servers through c-ares (pycares), driven by the Twisted reactor: an optional engine.

`CaresQuerier` does what `gateway.filters._dnsquery.DnsQuerier` does, with the
same `ask(name, qname, rdtype, notify)`, so `DnsLookups` can take either: c-ares
builds, sends, retransmits, matches (id, server, question), turns to TCP for a
truncated answer, drops EDNS for a server that does not know it, and parses,
all in C. No thread: c-ares tells us (its socket-state callback) which sockets
to watch, the reactor calls `ares_process_fd` when one is readable or
writable, and one reactor timer at a time drives c-ares's retransmissions and
our deadlines.

Why the C functions of pycares 5's cffi module (private: hence pycares<6)
rather than `pycares.Channel`: its query callback drops the answer of a
NXDOMAIN or NODATA, and with it the SOA whose minimum says how long the
negative answer may be cached; and its Channel cannot turn off c-ares's own
query cache, which would answer our retries from a second cache we do not
control.

Off by default: against rbldnsd it measured no clear CPU saving per lookup
(bench/dns_bench.py --engine c-ares), since most of a lookup's cost is the
Deferreds, the cache and the kernel's sendto, which are the same either way.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import pycares  # noqa: F401  (initialises the c-ares library)
from pycares import _cares
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from zope.interface import implementer

from gateway.delivery.resolver import DnsTemporaryError
from gateway.filters._dnsquery import Notify, Server
from gateway.filters._dnswire import Reply

ffi: Any = _cares.ffi
lib: Any = _cares.lib

# Option bits of ares.h that pycares's module does not name.
_OPT_UDP_MAX_QUERIES = 1 << 19
_OPT_MAXTIMEOUTMS = 1 << 20
_OPT_QUERY_CACHE = 1 << 21

USES_PER_SOCKET = 2000  # then c-ares opens a new socket, with a new random port
FIRST_RETRY = 1.0  # seconds before the first retransmission, as DnsQuerier
_BAD = ffi.cast("ares_socket_t", lib.ARES_SOCKET_BAD)
_TYPE_A, _TYPE_AAAA, _TYPE_CNAME, _TYPE_SOA = 1, 28, 5, 6
_TYPE_PTR, _TYPE_MX, _TYPE_TXT = 12, 15, 16
_NOERROR, _NXDOMAIN = 0, 3
_ANSWER, _AUTHORITY = lib.ARES_SECTION_ANSWER, lib.ARES_SECTION_AUTHORITY


def _text(pointer: Any) -> str:
    return "" if pointer == ffi.NULL else ffi.string(pointer).decode("ascii", "replace")


def _lower(pointer: Any) -> str:
    return _text(pointer).rstrip(".").lower()


def _value(rr: Any, rdtype: int) -> Any:
    """A record's value in the form `gateway.filters.dns` caches (as its `_value` gives)."""
    if rdtype == _TYPE_A:
        return socket.inet_ntop(
            socket.AF_INET, ffi.buffer(lib.ares_dns_rr_get_addr(rr, lib.ARES_RR_A_ADDR), 4)[:]
        )
    if rdtype == _TYPE_AAAA:
        address = lib.ares_dns_rr_get_addr6(rr, lib.ARES_RR_AAAA_ADDR)
        return socket.inet_ntop(socket.AF_INET6, ffi.buffer(address, 16)[:])
    if rdtype == _TYPE_TXT:
        chunks = []
        length = ffi.new("size_t *")
        for index in range(lib.ares_dns_rr_get_abin_cnt(rr, lib.ARES_RR_TXT_DATA)):
            data = lib.ares_dns_rr_get_abin(rr, lib.ARES_RR_TXT_DATA, index, length)
            if data != ffi.NULL:
                chunks.append(ffi.buffer(data, length[0])[:].decode("utf-8", "replace"))
        return "".join(chunks)
    if rdtype == _TYPE_PTR:
        return _lower(lib.ares_dns_rr_get_str(rr, lib.ARES_RR_PTR_DNAME))
    if rdtype == _TYPE_MX:
        preference = int(lib.ares_dns_rr_get_u16(rr, lib.ARES_RR_MX_PREFERENCE))
        return (preference, _lower(lib.ares_dns_rr_get_str(rr, lib.ARES_RR_MX_EXCHANGE)))
    raise ValueError(f"unsupported record type {rdtype}")


def _negative_ttl(record: Any) -> int | None:
    for index in range(lib.ares_dns_record_rr_cnt(record, _AUTHORITY)):
        rr = lib.ares_dns_record_rr_get_const(record, _AUTHORITY, index)
        if lib.ares_dns_rr_get_type(rr) == _TYPE_SOA:
            return min(
                int(lib.ares_dns_rr_get_ttl(rr)), int(lib.ares_dns_rr_get_u32(rr, lib.ARES_RR_SOA_MINIMUM))
            )
    return None


def read_reply(record: Any, name: str, rdtype: int, nxdomain: bool) -> Reply:
    """The `Reply` of a c-ares answer to (name, rdtype): its records at `name`, CNAMEs followed."""
    if nxdomain:
        return Reply(_NXDOMAIN, (), None, _negative_ttl(record))
    records = []
    for index in range(lib.ares_dns_record_rr_cnt(record, _ANSWER)):
        rr = lib.ares_dns_record_rr_get_const(record, _ANSWER, index)
        records.append((_lower(lib.ares_dns_rr_get_name(rr)), lib.ares_dns_rr_get_type(rr), rr))
    ttls: list[int] = []
    for _ in range(8):  # CNAME hops, as gateway.filters.dns
        values: list[Any] = []
        alias = None
        for owner, kind, rr in records:
            if owner != name or lib.ares_dns_rr_get_class(rr) != 1:
                continue
            if kind == rdtype:
                value = _value(rr, rdtype)
                if value not in values:
                    values.append(value)
                ttls.append(int(lib.ares_dns_rr_get_ttl(rr)))
            elif kind == _TYPE_CNAME and alias is None:
                alias = rr
        if values:
            return Reply(_NOERROR, tuple(values), min(ttls), None)
        if alias is None:
            break
        ttls.append(int(lib.ares_dns_rr_get_ttl(alias)))
        name = _lower(lib.ares_dns_rr_get_str(alias, lib.ARES_RR_CNAME_CNAME))
    return Reply(_NOERROR, (), None, _negative_ttl(record))


@implementer(IReadDescriptor, IWriteDescriptor)
class _Descriptor:
    """One c-ares socket, as the reactor sees it."""

    def __init__(self, querier: CaresQuerier, fd: int) -> None:
        self.querier = querier
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.querier._process(self.fd, _BAD)

    def doWrite(self) -> None:
        self.querier._process(_BAD, self.fd)

    def connectionLost(self, reason: Any) -> None:
        pass  # c-ares closes its sockets itself

    def logPrefix(self) -> str:
        return "c-ares"


class _Question:
    __slots__ = ("deadline", "done", "name", "notify", "rdtype")

    def __init__(self, name: str, rdtype: int, notify: Notify, deadline: float) -> None:
        self.name = name
        self.rdtype = rdtype
        self.notify = notify
        self.deadline = deadline
        self.done = False


class CaresQuerier:
    """Sends questions to the name servers through one c-ares channel; see the module docstring."""

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
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.log_problem = log_problem or (lambda text: None)
        self.in_flight: dict[int, _Question] = {}  # by key, in the order asked (so by deadline)
        self.descriptors: dict[int, _Descriptor] = {}
        self._next_key = 1
        self._timer: Any = None
        # A callback of ours may close the querier while c-ares is running it (a test's cleanup,
        # a service stop): then the channel is destroyed once c-ares has returned, never inside.
        self._depth = 0
        self._closing: Any = None  # the channel to destroy
        self._tv = ffi.new("struct timeval *")
        # Both callbacks are made once: c-ares gets a number as each question's argument.
        self._query_callback = ffi.callback(
            "void(void *, ares_status_t, size_t, const ares_dns_record_t *)", self._answered
        )
        self._state_callback = ffi.callback("void(void *, ares_socket_t, int, int)", self._socket_state)
        options = ffi.new("struct ares_options *")
        options.flags = lib.ARES_FLAG_EDNS | lib.ARES_FLAG_NOSEARCH
        options.timeout = max(1, int(min(FIRST_RETRY, timeout / 3) * 1000))
        options.maxtimeout = max(1, int(timeout * 1000))
        options.tries = 8  # our deadline comes first: c-ares retries until then
        options.udp_max_queries = USES_PER_SOCKET
        options.qcache_max_ttl = 0  # DnsLookups caches
        options.sock_state_cb = self._state_callback
        options.sock_state_cb_data = ffi.NULL
        mask = (
            lib.ARES_OPT_FLAGS
            | lib.ARES_OPT_TIMEOUTMS
            | _OPT_MAXTIMEOUTMS
            | lib.ARES_OPT_TRIES
            | _OPT_UDP_MAX_QUERIES
            | _OPT_QUERY_CACHE
            | lib.ARES_OPT_SOCK_STATE_CB
        )
        self._channel_box = ffi.new("ares_channel *")
        status = lib.ares_init_options(self._channel_box, options, mask)
        if status != lib.ARES_SUCCESS:
            raise OSError(f"c-ares: {_text(lib.ares_strerror(status))}")
        self._channel: Any = self._channel_box[0]
        servers = ",".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in nameservers
        )
        status = lib.ares_set_servers_csv(self._channel, servers.encode("ascii"))
        if status != lib.ARES_SUCCESS:
            lib.ares_destroy(self._channel)
            raise ValueError(f"c-ares refused the name servers {servers}: {_text(lib.ares_strerror(status))}")

    # -- questions --------------------------------------------------------------------------

    def ask(self, name: str, qname: bytes, rdtype: int, notify: Notify) -> None:
        """As `DnsQuerier.ask`: `notify` gets the `Reply` (NOERROR, NXDOMAIN) or a DnsTemporaryError."""
        if self._channel is None:
            notify(DnsTemporaryError(f"{name}: the resolver is shutting down"))
            return
        try:
            ascii_name = name.encode("ascii")
        except UnicodeEncodeError:
            ascii_name = name.encode("idna")  # `qname` was made so, and c-ares answers in this form
            name = ascii_name.decode("ascii")
        key = self._next_key
        self._next_key = key + 1
        question = _Question(name, rdtype, notify, self.reactor.seconds() + self.timeout)
        self.in_flight[key] = question
        channel = self._channel
        self._depth += 1
        try:
            lib.ares_query_dnsrec(
                channel, ascii_name, 1, rdtype, self._query_callback, ffi.cast("void *", key), ffi.NULL
            )
        finally:
            self._depth -= 1
            if self._depth == 0 and self._closing is not None:
                self._destroy()
        if self._timer is None:
            self._schedule()

    def _answered(self, argument: Any, status: int, timeouts: int, record: Any) -> None:
        """c-ares's callback (inside `ares_process_fd`, `ares_query_dnsrec` or `ares_destroy`)."""
        question = self.in_flight.pop(int(ffi.cast("intptr_t", argument)), None)
        if question is None or question.done:
            return  # given up at its deadline already
        question.done = True
        try:
            if status == lib.ARES_SUCCESS or status == lib.ARES_ENODATA or status == lib.ARES_ENOTFOUND:
                if record == ffi.NULL:
                    raise ValueError("no answer record")
                outcome: Reply | DnsTemporaryError = read_reply(
                    record, question.name, question.rdtype, status == lib.ARES_ENOTFOUND
                )
            else:
                problem = _text(lib.ares_strerror(status))
                self.log_problem(f"{question.name}/{question.rdtype}: {problem}")
                outcome = DnsTemporaryError(f"{question.name}: {problem}")
        except Exception as error:  # an answer c-ares accepted and we cannot read
            outcome = DnsTemporaryError(f"{question.name}: unreadable answer: {error}")
        question.notify(outcome)

    # -- sockets and time -------------------------------------------------------------------

    def _socket_state(self, data: Any, fd: int, readable: int, writable: int) -> None:
        descriptor = self.descriptors.get(fd)
        if descriptor is None:
            if not (readable or writable):
                return
            descriptor = self.descriptors[fd] = _Descriptor(self, fd)
        if readable:
            self.reactor.addReader(descriptor)
        else:
            self.reactor.removeReader(descriptor)
        if writable:
            self.reactor.addWriter(descriptor)
        else:
            self.reactor.removeWriter(descriptor)
        if not (readable or writable):
            del self.descriptors[fd]

    def _process(self, read_fd: Any, write_fd: Any) -> None:
        channel = self._channel
        if channel is None:
            return
        self._depth += 1
        try:
            lib.ares_process_fd(channel, read_fd, write_fd)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._closing is not None:
                self._destroy()

    def _schedule(self) -> None:
        """One timer: c-ares's next retransmission or the first deadline, whichever comes first."""
        self._timer = None
        if not self.in_flight or self._channel is None:
            return
        first = next(iter(self.in_flight.values()))
        delay = max(0.0, first.deadline - self.reactor.seconds())
        if lib.ares_timeout(self._channel, ffi.NULL, self._tv) != ffi.NULL:
            delay = min(delay, self._tv.tv_sec + self._tv.tv_usec / 1e6)
        self._timer = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._process(_BAD, _BAD)  # c-ares's retransmissions and server turns
        now = self.reactor.seconds()
        servers = ", ".join(f"{host}:{port}" for host, port in self.nameservers)
        while self.in_flight:
            key, question = next(iter(self.in_flight.items()))
            if question.deadline > now:
                break
            del self.in_flight[key]  # c-ares's late answer, if any, finds nobody
            question.done = True
            question.notify(
                DnsTemporaryError(f"{question.name}: no answer within {self.timeout:g} s from {servers}")
            )
        if self._timer is None:
            self._schedule()

    @property
    def open_sockets(self) -> int:
        return len(self.descriptors)

    def close(self) -> Deferred[Any]:
        """Fail what is in flight and close the sockets (service stop, tests)."""
        channel, self._channel = self._channel, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if channel is None:
            return succeed(None)
        for question in list(self.in_flight.values()):
            if not question.done:
                question.done = True
                question.notify(DnsTemporaryError(f"{question.name}: the resolver is shutting down"))
        self.in_flight.clear()
        self._closing = channel
        if self._depth == 0:
            self._destroy()
        return succeed(None)

    def _destroy(self) -> None:
        channel, self._closing = self._closing, None
        lib.ares_destroy(channel)  # closes its sockets; the questions it cancels find nobody
        for descriptor in list(self.descriptors.values()):
            self.reactor.removeReader(descriptor)
            self.reactor.removeWriter(descriptor)
        self.descriptors.clear()
