"""The common DNS answers, read by hand from the wire; dnspython reads the rest.

Nearly every answer a mail gateway's filters get is one of a few shapes: a
DNSBL's A records or its NXDOMAIN, a NODATA with the zone's SOA, an A or AAAA
answer. `parse_reply` reads those, several times faster than
`dns.message.from_wire` (which builds Name, Rdata and RRset objects a filter
never looks at), and answers None for anything else: a truncated answer, a
CNAME, an unknown record, EDNS options, a compression pointer it cannot follow
the way dnspython does. The caller then hands the datagram to dnspython,
which decides as before. So the hand parser never accepts what dnspython
would refuse: it gives a `Reply` only for a well-formed message whose header
(id, QR, opcode) and question (name, type, class IN) match what was asked,
and whose every record it has checked as dnspython would (names, lengths,
nothing trailing). tests/unit/test_filter_dnswire.py holds it to dnspython
with generated messages.
"""

from __future__ import annotations

import os
import socket
import struct
from array import array
from typing import NamedTuple

import dns.ipv6

TYPE_A = 1
TYPE_NS = 2
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
MAX_POINTERS = 16  # dnspython's MAX_COMPRESSION_POINTER_CHAIN

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_SOA_MINIMUM = struct.Struct("!I")
# QR set, opcode QUERY, TC clear: the only header this parser reads.
_HEADER_MASK, _HEADER_WANTED = 0xFA00, 0x8000
_ADDRESS_SIZE = {TYPE_A: 4, TYPE_AAAA: 16}


class Reply(NamedTuple):
    """What `gateway.filters.dns` needs of an answer to (name, A or AAAA or any type's negative)."""

    rcode: int
    values: tuple[str, ...]  # the addresses at the name asked, in order, without repeats
    ttl: int | None  # the least TTL of those records; None when there are none
    negative_ttl: int | None  # min(TTL, minimum) of the authority's SOA; None without one


def parse_reply(wire: bytes, query_id: int, qname: bytes, rdtype: int) -> Reply | None:
    """The Reply in `wire` to query `query_id` for (qname, rdtype, IN); None: ask dnspython.

    `qname` is the lower-case wire form the question was sent with.
    """
    if len(wire) < 12:
        return None
    ident, flags, questions, answers, authority, additional = _HEADER.unpack_from(wire)
    if ident != query_id or flags & _HEADER_MASK != _HEADER_WANTED or questions != 1:
        return None
    offset = 12 + len(qname)
    if wire[12:offset].lower() != qname or wire[offset : offset + 4] != struct.pack("!HH", rdtype, CLASS_IN):
        return None
    offset += 4
    size = len(wire)
    values: list[str] = []
    ttl: int | None = None
    negative_ttl: int | None = None
    rcode = flags & 0xF
    for _ in range(answers):
        name, offset = _read_name(wire, offset, size, qname)
        if name != qname or offset + 10 > size:
            return None  # a CNAME's target, another owner: dnspython follows those
        kind, rdclass, rr_ttl, length = _RR.unpack_from(wire, offset)
        offset += 10
        if (
            kind != rdtype
            or rdclass != CLASS_IN
            or length != _ADDRESS_SIZE.get(kind)
            or offset + length > size
        ):
            return None
        rdata = wire[offset : offset + length]
        offset += length
        value = socket.inet_ntoa(rdata) if kind == TYPE_A else dns.ipv6.inet_ntoa(rdata)
        if value not in values:
            values.append(value)
        rr_ttl = 0 if rr_ttl > 0x7FFFFFFF else rr_ttl  # RFC 2181 8, as dnspython does
        ttl = rr_ttl if ttl is None else min(ttl, rr_ttl)
    for _ in range(authority):
        name, offset = _read_name(wire, offset, size, qname)
        if name is None or offset + 10 > size:
            return None
        kind, rdclass, rr_ttl, length = _RR.unpack_from(wire, offset)
        offset += 10
        end = offset + length
        if rdclass != CLASS_IN or end > size:
            return None
        rr_ttl = 0 if rr_ttl > 0x7FFFFFFF else rr_ttl
        if kind == TYPE_SOA:
            if negative_ttl is not None:
                return None  # two SOAs: dnspython's rules for merging them are its own
            mname, offset = _read_name(wire, offset, end, qname)
            if mname is None:
                return None
            rname, offset = _read_name(wire, offset, end, qname)
            if rname is None or offset + 20 != end:
                return None
            (minimum,) = _SOA_MINIMUM.unpack_from(wire, offset + 16)
            negative_ttl = min(rr_ttl, minimum)
        elif kind == TYPE_NS:
            target, offset = _read_name(wire, offset, end, qname)
            if target is None or offset != end:
                return None
        else:
            return None
        offset = end
    opt_seen = False
    for _ in range(additional):
        name, offset = _read_name(wire, offset, size, qname)
        if name is None or offset + 10 > size:
            return None
        kind, rdclass, rr_ttl, length = _RR.unpack_from(wire, offset)
        offset += 10
        if kind == TYPE_OPT:
            # The root's OPT, once, without options, without an extended rcode.
            if opt_seen or name != b"\x00" or length != 0 or rr_ttl >> 24:
                return None
            opt_seen = True
        elif rdclass != CLASS_IN or length != _ADDRESS_SIZE.get(kind):
            return None  # glue addresses only
        offset += length
        if offset > size:
            return None
    if offset != size:
        return None  # trailing bytes: dnspython refuses the message
    return Reply(rcode, tuple(values), ttl, negative_ttl)


def _read_name(wire: bytes, offset: int, end: int, qname: bytes) -> tuple[bytes | None, int]:
    """(the lower-case wire form of the name at `offset`, where the record goes on); None if bad.

    The compression rules are dnspython's: a pointer points before the name
    (and before the previous pointer's target), the pointed-to name lies wholly
    before where the pointer was followed from, at most 16 pointers.
    """
    if wire[offset : offset + 2] == b"\xc0\x0c" and offset + 2 <= end:
        return qname, offset + 2  # a pointer to the question's name: nearly every answer
    labels: list[bytes] = []
    total = 1
    start = biggest = offset
    after = -1
    hops = 0
    while True:
        if offset >= end:
            return None, offset
        count = wire[offset]
        if count == 0:
            offset += 1
            break
        if count < 64:
            if offset + 1 + count > end:
                return None, offset
            labels.append(wire[offset : offset + 1 + count])
            total += count + 1
            offset += 1 + count
        elif count >= 192:
            if offset + 2 > end:
                return None, offset
            target = (count & 0x3F) << 8 | wire[offset + 1]
            hops += 1
            if target >= biggest or hops > MAX_POINTERS:
                return None, offset
            if after < 0:
                after = offset + 2
            biggest = target
            end = start  # the target must not run into the part already read
            offset = start = target
        else:
            return None, offset  # the obsolete label types
    if total > 255:
        return None, offset
    return b"".join(labels).lower() + b"\x00", after if after >= 0 else offset


class RandomPool:
    """Unpredictable 16-bit numbers (query ids, choices) from the kernel's CSPRNG, bought in bulk.

    `secrets.randbelow` is one getrandom() system call a number; this reads
    4 KiB at a time (2,048 numbers a call) from the same source, and drops what
    it holds in a forked child so that two processes never share numbers.
    """

    CHUNK = 4096

    def __init__(self) -> None:
        self._numbers = array("H")

    def forget(self) -> None:
        """Drop the numbers held (in a forked child: the parent holds the same ones)."""
        self._numbers = array("H")

    def number(self) -> int:
        """A random number in 0..65535."""
        try:
            return self._numbers.pop()
        except IndexError:
            self._numbers.frombytes(os.urandom(self.CHUNK))
            return self._numbers.pop()

    def below(self, limit: int) -> int:
        """A random number in 0..limit-1 (limit <= 65536), without modulo bias."""
        if limit == 1:
            return 0
        top = 65536 - 65536 % limit  # drawn values at or above `top` would favour small results
        while True:
            value = self.number()
            if value < top:
                return value % limit


RANDOM = RandomPool()
os.register_at_fork(after_in_child=RANDOM.forget)
