"""The hand-written answer parser (`_dnswire.parse_reply`) against dnspython, which it stands in for.

Messages are built with dnspython (random names, cases, record sets, SOAs,
CNAMEs, EDNS, flags, ids), then sometimes damaged (cut short, a byte changed,
bytes added). Whenever the hand parser gives a Reply, dnspython must have
accepted the same bytes as the answer to the same question, with the same
rcode, and `interpret` must make the same answer and TTL of both; when it
gives None the querier asks dnspython, so None is always safe, but the common
shapes must not come out None (or the fast path is dead).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from unittest import mock

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.filters._dnsquery import query_wire, wire_name
from gateway.filters._dnswire import RandomPool, parse_reply
from gateway.filters.dns import interpret

RDTYPES = ("A", "AAAA", "TXT", "MX", "PTR")
RCODES = (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR)

labels = st.text(alphabet="abcXYZ019-", min_size=1, max_size=6)
names = st.lists(labels, min_size=1, max_size=4).map(lambda parts: ".".join([*parts, "bl", "test"]))
ttls = st.one_of(st.integers(0, 100_000), st.integers(0, 2**32 - 1))
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**32 - 1).map(lambda n: n | 0xFFFF << 32),  # IPv4-mapped
    st.integers(0, 2**16),  # mostly zeros
).map(lambda n: str(ipaddress.IPv6Address(n)))


def _rdata(rdtype: str, draw: Any) -> str:
    if rdtype == "A":
        return str(draw(ipv4))
    if rdtype == "AAAA":
        return str(draw(ipv6))
    if rdtype == "TXT":
        return '"listed"'
    if rdtype == "MX":
        return "10 mx.example.test."
    if rdtype == "CNAME":
        return draw(names) + "."
    return "host.example.test."  # PTR, NS


@st.composite
def exchanges(draw: Any) -> tuple[bytes, int, bytes, int, bool]:
    """(response wire, query id, qname wire, rdtype, common) for a question and a response (or not).

    Half are plain (the shapes name servers send: records of the type asked,
    at most one SOA, NS, glue), half odd (CNAMEs, other records, more SOAs,
    wrong flags and ids, damaged bytes). `common`: a plain one with addresses or no
    answer, a shape the hand parser must read.
    """
    plain = draw(st.booleans())
    rare = st.integers(0, 15).map(lambda n: n == 9 and not plain)
    name = draw(names).lower()
    rdtype = draw(st.sampled_from(RDTYPES))
    query = dns.message.make_query(name, rdtype, use_edns=draw(st.sampled_from([False, 0])))
    response = dns.message.make_response(query)
    if draw(st.booleans()):  # a server that echoes the question in another case (0x20)
        echoed = draw(st.sampled_from([name.upper(), name.title()]))
        response.question = [
            dns.rrset.RRset(dns.name.from_text(echoed), dns.rdataclass.IN, query.question[0].rdtype)
        ]
    response.set_rcode(draw(st.sampled_from(RCODES)))
    owner = dns.name.from_text(name)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([rdtype] if plain else [rdtype, "CNAME", "A", "AAAA", "TXT"]))
        at = owner if plain or draw(st.booleans()) else dns.name.from_text(draw(names))
        response.answer.append(dns.rrset.from_text(at, draw(ttls), "IN", kind, _rdata(kind, draw)))
    for number in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(["NS"] if plain and number else ["SOA", "NS", "TXT"][: 2 if plain else 3])
        )
        zone = draw(st.sampled_from(["bl.test.", "test.", name + "."]))
        text = (
            f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {draw(ttls)}"
            if kind == "SOA"
            else _rdata(kind, draw)
        )
        response.authority.append(dns.rrset.from_text(zone, draw(ttls), "IN", kind, text))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["A", "AAAA", "TXT"][: 2 if plain else 3]))
        response.additional.append(
            dns.rrset.from_text("ns.bl.test.", draw(ttls), "IN", kind, _rdata(kind, draw))
        )
    if draw(st.booleans()):
        response.use_edns(0, payload=1232)
        if draw(rare):
            response.set_rcode(dns.rcode.BADVERS)  # an extended rcode, in the OPT record
    if draw(rare):
        response.flags |= dns.flags.TC
    if draw(rare):
        response.flags &= ~dns.flags.QR
    if draw(rare):
        response.set_opcode(dns.opcode.NOTIFY)
    query_id = (response.id + 1) % 65536 if draw(rare) else response.id
    wire = response.to_wire()
    damage = 0 if plain else draw(st.integers(0, 3))
    if damage == 1:
        wire = wire[: draw(st.integers(0, len(wire)))]
    elif damage == 2:
        where = draw(st.integers(0, len(wire) - 1))
        wire = wire[:where] + bytes([draw(st.integers(0, 255))]) + wire[where + 1 :]
    elif damage == 3:
        wire += draw(st.binary(min_size=1, max_size=4))
    qname = wire_name(name)
    assert qname is not None
    common = plain and (rdtype in ("A", "AAAA") or not response.answer)
    return wire, query_id, qname, dns.rdatatype.from_text(rdtype), common


def dnspython_reading(wire: bytes, query_id: int, qname: bytes, rdtype: int) -> Any:
    """What the querier made of a datagram before the hand parser: None (ignored), "TC", or the message."""
    try:
        response = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None
    if response.id != query_id or not response.flags & dns.flags.QR or response.opcode() != 0:
        return None
    if len(response.question) != 1:
        return None
    question = response.question[0]
    if (
        question.rdtype != rdtype
        or question.rdclass != dns.rdataclass.IN
        or question.name.to_wire().lower() != qname
    ):
        return None
    if response.flags & dns.flags.TC:
        return "TC"
    return response


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchanges())
def test_the_hand_parser_agrees_with_dnspython_whenever_it_answers(
    exchange: tuple[bytes, int, bytes, int, bool],
) -> None:
    wire, query_id, qname, rdtype, common = exchange
    reply = parse_reply(wire, query_id, qname, rdtype)
    if reply is None:
        assert not common, "a common answer was left to dnspython"
        return  # dnspython decides, as before
    message = dnspython_reading(wire, query_id, qname, rdtype)
    assert message is not None and message != "TC", "the hand parser took what dnspython refuses"
    assert reply.rcode == message.rcode()
    if reply.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        text = dns.rdatatype.to_text(rdtype)
        assert interpret(reply, text, 60.0) == interpret(message, text, 60.0)


def answer_to(name: str, rdtype: str, *records: str, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> Any:
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if records:
        response.answer.append(dns.rrset.from_text(name + ".", 2100, "IN", rdtype, *records))
    return response


def soa(response: Any, minimum: int = 60) -> Any:
    text = f"ns.bl.test. hostmaster.bl.test. 1 3600 600 86400 {minimum}"
    response.authority.append(dns.rrset.from_text("bl.test.", 3600, "IN", "SOA", text))
    return response


def read(response: Any) -> Any:
    name = response.question[0].name.to_text(omit_final_dot=True)
    qname = wire_name(name)
    assert qname is not None
    return parse_reply(response.to_wire(), response.id, qname, response.question[0].rdtype)


def test_the_common_answers_are_read_by_hand() -> None:
    listed = read(answer_to("2.0.0.127.bl.test", "A", "127.0.0.2", "127.0.0.4"))
    assert listed is not None and sorted(listed.values) == ["127.0.0.2", "127.0.0.4"] and listed.ttl == 2100
    nxdomain = read(soa(answer_to("9.0.0.127.bl.test", "A", rcode=dns.rcode.NXDOMAIN), minimum=30))
    assert nxdomain is not None and nxdomain.rcode == dns.rcode.NXDOMAIN and nxdomain.negative_ttl == 30
    assert read(answer_to("9.0.0.127.bl.test", "A", rcode=dns.rcode.NXDOMAIN)) is not None  # rbldnsd: no SOA
    nodata = read(soa(answer_to("bl.test", "TXT")))
    assert nodata is not None and nodata.values == () and nodata.negative_ttl == 60
    v6 = read(answer_to("mx.bl.test", "AAAA", "2001:db8::1"))
    assert v6 is not None and v6.values == ("2001:db8::1",)


def test_unusual_answers_are_left_to_dnspython() -> None:
    truncated = answer_to("2.0.0.127.bl.test", "A", "127.0.0.2")
    truncated.flags |= dns.flags.TC
    assert read(truncated) is None
    assert read(answer_to("bl.test", "TXT", '"a test list"')) is None
    alias = answer_to("www.bl.test", "A")
    alias.answer.append(dns.rrset.from_text("www.bl.test.", 60, "IN", "CNAME", "host.bl.test."))
    assert read(alias) is None


def test_a_spoofed_answer_is_not_read_by_hand() -> None:
    genuine = answer_to("2.0.0.127.bl.test", "A", "127.0.0.2")
    wire = genuine.to_wire()
    qname = wire_name("2.0.0.127.bl.test")
    assert qname is not None
    assert parse_reply(wire, genuine.id ^ 1, qname, 1) is None  # another id
    other = wire_name("3.0.0.127.bl.test")
    assert other is not None
    assert parse_reply(wire, genuine.id, other, 1) is None  # another question
    assert parse_reply(wire, genuine.id, qname, 28) is None  # another type
    query = query_wire(genuine.id, qname, 1, edns=True)
    assert parse_reply(query, genuine.id, qname, 1) is None  # our own question reflected (QR clear)


def test_random_numbers_come_from_the_kernel_a_chunk_at_a_time() -> None:
    pool = RandomPool()
    with mock.patch("gateway.filters._dnswire.os.urandom", wraps=os.urandom) as urandom:
        numbers = [pool.number() for _ in range(4096)]
    assert urandom.call_count == 2  # 2,048 numbers a read, not one system call each
    assert len(set(numbers)) > 3500  # 4,096 draws from 65,536 values: few repeats
    choices = [pool.below(3) for _ in range(3000)]
    assert set(choices) == {0, 1, 2} and all(800 < choices.count(n) < 1200 for n in range(3))
    pool.forget()
    with mock.patch("gateway.filters._dnswire.os.urandom", wraps=os.urandom) as urandom:
        pool.number()
    assert urandom.call_count == 1  # what a forked child's pool does first: read its own


def nxdomain_with_soa_names(names: bytes) -> bytes:
    """An NXDOMAIN for 2.0.0.127.bl.test/A whose SOA's mname and rname are `names` (raw)."""
    qname = wire_name("2.0.0.127.bl.test")
    assert qname is not None
    header = bytes.fromhex("1234 8183 0001 0000 0001 0000")
    question = qname + b"\x00\x01\x00\x01"
    rdata = names + bytes(16) + (30).to_bytes(4, "big")  # serial .. expire 0, minimum 30
    owner = b"\xc0\x16"  # "bl.test", inside the question's name
    return (
        header
        + question
        + owner
        + b"\x00\x06\x00\x01\x00\x00\x0e\x10"
        + len(rdata).to_bytes(2, "big")
        + rdata
    )


MNAME_AT = 12 + 19 + 4 + 2 + 10  # header, question, the owner's pointer, type..rdlength


@pytest.mark.parametrize(
    ("names", "valid"),
    [
        (b"\x02ns\xc0\x16\x00", True),  # "ns" and a pointer back into the question; "."
        (b"\x02ns\x00\xc0" + bytes([MNAME_AT]), True),  # "ns."; a pointer to it
        (b"\xc0" + bytes([MNAME_AT]) + b"\x00", False),  # a pointer to itself
        (b"\xc0" + bytes([MNAME_AT + 4]) + b"\x00", False),  # a pointer forward
        (b"\xc0" + bytes([MNAME_AT - 1]) + b"\x00", False),  # back, into a label running over it
        # "\x03." then a pointer to that label, whose 3 octets run over the pointer itself
        (b"\x01\x03\x00\xc0" + bytes([MNAME_AT + 1]), False),
        (b"\x80\x01\x00", False),  # an obsolete label type
        (b"\x02ns" + b"\x3fx" * 5, False),  # runs past the record
    ],
)
def test_compression_pointers_are_followed_by_dnspython_rules(names: bytes, valid: bool) -> None:
    wire = nxdomain_with_soa_names(names)
    qname = wire_name("2.0.0.127.bl.test")
    assert qname is not None
    accepted = dnspython_reading(wire, 0x1234, qname, 1)
    reply = parse_reply(wire, 0x1234, qname, 1)
    assert (accepted is not None) == valid
    assert (reply is not None) == valid
    if reply is not None:
        assert interpret(reply, "A", 60.0) == interpret(accepted, "A", 60.0)
